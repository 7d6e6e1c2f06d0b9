"""Data: the owners' local corpora (sources), seqio Tasks and Mixtures, the embedded FlexMix-mini."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow only feeds data: keep its logs quiet
