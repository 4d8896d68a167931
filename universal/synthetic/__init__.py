"""Synthetic abdominal CT phantoms and the demo datasets written from them in real datasets' layouts."""
