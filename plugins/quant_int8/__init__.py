"""int8 / int4 base quantization through optimum-quanto (skeleton: precisions are registered)."""
