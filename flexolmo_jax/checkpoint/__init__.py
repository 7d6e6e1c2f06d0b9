"""Orbax storage of models, expert artifacts and training state."""
