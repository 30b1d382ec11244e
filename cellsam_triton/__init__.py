"""cellsam-triton: cell segmentation with SAM-family models served by NVIDIA Triton."""

__version__ = "0.1.0"
