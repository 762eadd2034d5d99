"""The model side: adapters on the denoiser (types, targets, file layouts), quantized loading,
the VAE and text encoders, flow-matching arithmetic, driving diffusers pipelines, the LoRA
self-test and the model hub."""
