"""Flux.1 (dev, schnell) for tuner. Registered and listed; training arrives with its own issue."""
