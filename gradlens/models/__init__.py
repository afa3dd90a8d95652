"""Detector architectures: backbones, heads, checkpoints."""
