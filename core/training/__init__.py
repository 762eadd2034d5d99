"""The training step and what it is made of: the run's context and state, LoRA attachment and
the loss of a micro-batch, scheduled sampling, the EMA, the divergence guard, and the runtime
(device, precision, optimizer, schedule). ``tuner estimate`` traces these same functions."""
