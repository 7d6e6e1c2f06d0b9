"""The byte vocabulary's ids, readable without seqio (and so without TensorFlow): pad 0, eos 1,
unk 2, then the 256 bytes."""
BYTE_OFFSET = 3
