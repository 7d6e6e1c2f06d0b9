"""Data: the owners' local corpora (sources), seqio Tasks and Mixtures, the embedded FlexMix-mini."""
