"""Qwen-Image and Qwen-Image-Edit, written as a third-party family plugin would be."""
