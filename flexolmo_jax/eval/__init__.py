"""Evaluation: perplexity per domain over any saved model kind, and the baselines (soup, BTM)."""
