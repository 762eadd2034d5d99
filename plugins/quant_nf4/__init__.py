"""NF4 weight quantization (with double quantization) of the frozen denoiser through bitsandbytes."""
