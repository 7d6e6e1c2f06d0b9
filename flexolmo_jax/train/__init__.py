"""Trainers: the shared loop, public pre-training and expert training."""
