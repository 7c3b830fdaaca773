"""The training engine: building the parts, the training step, resume state, run log, devices and precision."""
