"""Cascade stages: a trained U-Net with its text encoder and diffusion settings, ready to sample."""
