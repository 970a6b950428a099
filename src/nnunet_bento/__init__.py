"""Serve trained nnU-Net v2 segmentation models as a BentoML bundle."""

__version__ = "0.1.0"
