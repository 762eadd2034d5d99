"""int8 / int4 weight quantization of the frozen denoiser through optimum-quanto."""
