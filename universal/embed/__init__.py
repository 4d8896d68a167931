"""Stage 4, embed: one CLIP text embedding per class of the class table."""
