"""A Hugging Face ``tokenizer.json`` as a seqio vocabulary (see ``vocabularies`` for specs)."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import seqio
import tensorflow as tf

from flexolmo_jax.paths import check_size

# A tokenizer config is a few KiB; a file far larger is refused before it is read (the
# tokenizer.json's own size is checked by ``vocabularies.load``).
MAX_CONFIG_BYTES = 16 << 20


def _read_json(path: str, limit: int) -> dict:
  check_size(path, limit)
  try:
    with open(path, encoding="utf-8") as fh:
      data = json.load(fh)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not valid JSON ({e}).") from e
  if not isinstance(data, dict):
    raise ValueError(f"{path}: expected a JSON object.")
  return data


def _token_text(value) -> str | None:
  """A special token as transformers writes it: a string, or an AddedToken's dict."""
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) else None


class TokenizerVocabulary(seqio.Vocabulary):
  """A Hugging Face ``tokenizer.json`` as a seqio vocabulary.

  Encoding adds no special tokens (seqio appends EOS itself), so ids equal
  ``AutoTokenizer(...).encode(text, add_special_tokens=False)`` on the same files (in Python; see
  ``zero_stand_in`` for TensorFlow). Decoding skips special tokens. EOS, PAD, BOS and UNK are
  named by ``config_files`` (a ``tokenizer_config.json`` and ``special_tokens_map.json``; the
  first that names a role wins; absent files are skipped). A tokenizer without an EOS token is
  refused, since documents are separated by it.
  """

  def __init__(self, path: str, config_files: tuple[str, ...] = ()):
    from tokenizers import Tokenizer

    self.path, self.config_files = os.path.abspath(path), tuple(config_files)
    try:
      self._tokenizer = Tokenizer.from_file(self.path)
    except Exception as e:  # the Rust library's parse errors are plain Exceptions
      raise ValueError(f"{self.path}: not a tokenizer.json the tokenizers library reads "
                       f"({e}).") from e
    self._tokenizer.no_padding()
    self._tokenizer.no_truncation()
    self._size = max(self._tokenizer.get_vocab(with_added_tokens=True).values()) + 1
    specials = self._special_tokens()
    self._ids = {}
    for role, text in specials.items():
      token_id = self._tokenizer.token_to_id(text)
      if token_id is None:
        raise ValueError(f"{self.path}: the {role} token {text!r} of its tokenizer config is not "
                         "in the vocabulary.")
      self._ids[role] = token_id
    if "eos" not in self._ids:
      named = " or ".join(self.config_files) or "a tokenizer config"
      raise ValueError(f"{self.path}: no eos_token in {named}; documents are separated by EOS.")
    if self._ids["eos"] == 0:
      raise ValueError(f"{self.path}: its eos_token has id 0, which seqio's packing reserves for "
                       "padding; this tokenizer cannot end documents in the input pipeline.")
    with open(self.path, "rb") as fh:
      self._digest = hashlib.sha256(fh.read()).hexdigest()
    super().__init__(extra_ids=0)

  def _special_tokens(self) -> dict[str, str]:
    found: dict[str, str] = {}
    for path in self.config_files:
      if not os.path.isfile(path):
        continue
      config = _read_json(path, MAX_CONFIG_BYTES)
      for role in ("eos", "pad", "bos", "unk"):
        text = _token_text(config.get(f"{role}_token"))
        if text is not None:
          found.setdefault(role, text)
    return found

  # -- seqio's interface ------------------------------------------------------------------------
  @property
  def eos_id(self) -> int:
    return self._ids["eos"]

  @property
  def unk_id(self) -> int | None:
    return self._ids.get("unk")

  @property
  def bos_id(self) -> int | None:
    return self._ids.get("bos")

  @property
  def tokenizer_pad_id(self) -> int | None:
    """The tokenizer's own PAD (for the exported generation config); seqio pads with 0."""
    return self._ids.get("pad")

  @property
  def sha256(self) -> str:
    """The tokenizer.json's SHA-256 (read once, when the vocabulary is built)."""
    return self._digest

  @property
  def zero_stand_in(self) -> int:
    """seqio's packing takes id 0 for padding: it cuts each example to its count of non-zero ids
    and masks zeros out of the segments and the loss. Id 0 is a real token here (OLMo-2's "!"), so
    TensorFlow encoding carries it as this id, one past the vocabulary, and ``tasks.lm_dataset``
    turns it back into 0 after packing."""
    return self._size

  @property
  def _base_vocab_size(self) -> int:
    return self._size

  def _encode(self, s: str) -> list[int]:
    return self._tokenizer.encode(s, add_special_tokens=False).ids

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    """Many texts at once (the library encodes them on several threads)."""
    return [e.ids for e in self._tokenizer.encode_batch(texts, add_special_tokens=False)]

  def tokenize_dataset(self, dataset: tf.data.Dataset, key: str = "targets",
                       batch: int = 128) -> tf.data.Dataset:
    """``dataset``'s ``key`` texts as ids, ``batch`` documents per call into the library (which
    spreads them over the host's cores): seqio's per-document tokenize, faster. The order is
    kept; id 0 comes out as ``zero_stand_in``, as from ``encode_tf``."""
    def encode(texts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
      ids = self.encode_batch([t.decode("utf-8") for t in texts])
      flat = np.concatenate([np.asarray(i, np.int32) for i in ids] or [np.zeros(0, np.int32)])
      return flat, np.asarray([len(i) for i in ids], np.int64)

    def tokenize(examples):
      flat, lengths = tf.numpy_function(encode, [examples[key]], (tf.int32, tf.int64),
                                        stateful=False)
      flat = tf.where(tf.reshape(flat, [-1]) == 0, self.zero_stand_in, tf.reshape(flat, [-1]))
      return {**examples, key: tf.RaggedTensor.from_row_lengths(flat, tf.reshape(lengths, [-1]))}

    return dataset.batch(batch).map(tokenize, num_parallel_calls=tf.data.AUTOTUNE,
                                    deterministic=True).unbatch()

  def _decode(self, ids) -> str:
    return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
    def encode(text) -> np.ndarray:     # bytes, or a 0-d array of them when run eagerly
      return np.asarray(self._encode(np.asarray(text).item().decode("utf-8")), np.int32)

    ids = tf.numpy_function(encode, [s], tf.int32, stateful=False)
    ids.set_shape([None])
    return tf.where(ids == 0, self.zero_stand_in, ids)

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    def decode(rows: np.ndarray) -> np.ndarray:
      flat = rows.reshape(-1, rows.shape[-1])
      out = [self._decode(r).encode("utf-8") for r in flat]
      return np.asarray(out, dtype=object).reshape(rows.shape[:-1])

    ids = tf.where(ids == self.zero_stand_in, 0, ids)
    text = tf.numpy_function(decode, [ids], tf.string, stateful=False)
    text.set_shape(ids.shape[:-1])
    return text

  def __eq__(self, other) -> bool:
    return (isinstance(other, TokenizerVocabulary) and self._digest == other._digest
            and self._ids == other._ids)

  def __hash__(self) -> int:
    return hash(self._digest)

  def __reduce__(self):   # the Rust tokenizer is rebuilt from its file, not pickled
    return (TokenizerVocabulary, (self.path, self.config_files))
