"""Conversion to and from the Hugging Face layout (FLEXOLMO_SPEC.md section 10)."""
