"""Vocabularies, named by a spec:

- ``byte``: seqio's ByteVocabulary (pad 0, eos 1, unk 2, byte b is b + 3; ByT5's ids);
- a SentencePiece ``.model`` file;
- a Hugging Face ``tokenizer.json`` (OLMo-2's and FlexOlmo's byte-level BPE among them), read by
  the Rust ``tokenizers`` library exactly as transformers' fast tokenizers read it, with its special
  tokens from the ``tokenizer_config.json`` beside it.

A spec's identity (kind, size, special ids, the files' SHA-256) is what a manifest records and
what makes two vocabularies the same. A saved model keeps its vocabulary's files beside its
parameters under fixed names (``saved_files``).
"""
from __future__ import annotations

import hashlib
import os

from flexolmo_jax import paths

BYTE = "byte"
SP_FILE = "vocabulary.model"              # a SentencePiece model, as kept beside a saved model
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
# OLMo-2's tokenizer.json is 7 MiB; a file far larger is refused before it is read.
MAX_TOKENIZER_BYTES = 256 << 20


def kind(spec: str) -> str:
  """``byte``, ``sentencepiece`` (a ``.model`` file) or ``tokenizer`` (a ``tokenizer.json``)."""
  if spec == BYTE:
    return "byte"
  if spec.endswith(".json"):
    return "tokenizer"
  return "sentencepiece"


def load(spec: str):
  """The seqio vocabulary of ``spec``; a missing file is named. (seqio and TensorFlow are imported
  here, not by this module: merging or exporting a model names vocabularies without them.)"""
  import seqio

  if spec == BYTE:
    return seqio.ByteVocabulary()
  if not os.path.isfile(spec):
    raise FileNotFoundError(f"Vocabulary {spec!r} does not exist: use 'byte', a SentencePiece "
                            ".model file or a Hugging Face tokenizer.json.")
  if kind(spec) == "tokenizer":
    from flexolmo_jax.data.hf_tokenizer import TokenizerVocabulary

    paths.check_size(spec, MAX_TOKENIZER_BYTES)
    return TokenizerVocabulary(spec, tokenizer_config_files(spec))
  return seqio.SentencePieceVocabulary(spec)


def tokenizer_config_files(spec: str) -> tuple[str, ...]:
  """The files beside a ``tokenizer.json`` that name its special tokens, in precedence order."""
  return tuple(os.path.join(os.path.dirname(spec), n) for n in (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP))


def _sha256(paths) -> str:
  digest = hashlib.sha256()
  for path in paths:
    with open(path, "rb") as fh:
      for chunk in iter(lambda: fh.read(1 << 20), b""):
        digest.update(chunk)
  return digest.hexdigest()


def identity(spec: str) -> dict:
  """What makes two vocabularies the same: kind, size, (tokenizers) the special ids, and the
  hash of the files that define the ids."""
  vocab = load(spec)
  if spec == BYTE:
    return {"kind": "byte", "size": vocab.vocab_size}
  if kind(spec) == "tokenizer":
    return {"kind": "tokenizer", "size": vocab.vocab_size, "eos": vocab.eos_id,
            "pad": vocab.tokenizer_pad_id, "bos": vocab.bos_id, "sha256": vocab.sha256}
  return {"kind": "sentencepiece", "size": vocab.vocab_size, "sha256": _sha256([spec])}


def describe(record: dict) -> str:
  """One line naming a vocabulary record (a manifest's or ``identity``'s) for error messages."""
  if record.get("kind") == "byte":
    return f"byte ({record.get('size')} ids)"
  sha = str(record.get("sha256", "?"))[:12]
  source = f", {record['spec']}" if "spec" in record else ""
  return f"{record.get('kind')} ({record.get('size')} ids, sha256 {sha}{source})"


def saved_files(spec: str) -> tuple[str, dict[str, str]]:
  """(the spec a saved model's manifest records, {file name beside the model: source path})."""
  if spec == BYTE:
    return BYTE, {}
  if kind(spec) == "tokenizer":
    files = {TOKENIZER_FILE: spec}
    files.update((os.path.basename(p), p) for p in tokenizer_config_files(spec) if os.path.isfile(p))
    return TOKENIZER_FILE, files
  return SP_FILE, {SP_FILE: spec}


def train_sentencepiece(dataset_dir: str, model_prefix: str, vocab_size: int = 8000,
                        max_documents: int = 100_000):
  """Trains a SentencePiece vocabulary locally on a prepared (public) dataset's train split.

  Ids 0/1/2 are pad/eos/unk as seqio expects. Returns the seqio vocabulary over the written model.
  """
  import seqio
  import sentencepiece as spm
  import tensorflow_datasets as tfds

  if not os.path.exists(model_prefix + ".model"):
    builder = tfds.builder_from_directory(dataset_dir)
    texts = (ex["text"].decode("utf-8") for ex in
             tfds.as_numpy(builder.as_dataset(split="train").take(max_documents)))
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    tmp_prefix = model_prefix + ".tmp"
    spm.SentencePieceTrainer.train(
        sentence_iterator=texts, model_prefix=tmp_prefix, vocab_size=vocab_size,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, byte_fallback=True,
        character_coverage=1.0, max_sentence_length=1 << 16, minloglevel=2,
        # Lossless on code and prose: no NFKC, keep every space and newline.
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, split_digits=True)
    os.replace(tmp_prefix + ".vocab", model_prefix + ".vocab")
    os.replace(tmp_prefix + ".model", model_prefix + ".model")   # last: marks completion
  return seqio.SentencePieceVocabulary(model_prefix + ".model")
