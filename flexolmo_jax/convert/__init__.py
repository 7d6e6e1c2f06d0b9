"""Conversion to and from the Hugging Face layout (docs/method.md §10)."""
