"""The CLIP-driven universal model: backbones, text-generated class heads and the checkpoint format."""
