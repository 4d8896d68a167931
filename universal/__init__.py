"""universal: a CLIP-driven universal segmentation workflow for abdominal CT."""

__version__ = "0.1.0"
