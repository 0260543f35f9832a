"""``python -m pipesched …``: one module per command, what they share, the built-in demo models."""
