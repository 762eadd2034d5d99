"""NF4 base quantization through bitsandbytes (skeleton: the precision is registered)."""
