"""The document as the privacy unit: one example per document, drawn the way the accountant assumes.

The packed stream of non-DP training mixes pieces of several documents in one row and spreads a
long document over several rows; either would let one document reach more than one clipped
gradient. Here every example is one training document: its tokens (with EOS) cut to
``chunks * seq_len``, laid out as ``chunks`` rows of ``seq_len`` (each row a segment of its own,
as the packed stream's chunks are), padding carrying no loss. Tokens past that length are not
used; the data card counts them.

Batches are index sets from ``jax_privacy.batch_selection`` (``CyclicPoissonSampling`` with one
cycle, i.e. Poisson sampling, or ``FixedBatchSampling``), drawn from the run's seed, so step ``s``
of a resumed run sees the same documents as an uninterrupted one. A batch is padded to a multiple
of ``pad_to`` with weight-0 examples (a Poisson batch's size varies; padding keeps the compiled
shapes few), which contribute exactly zero gradient.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Iterator

import numpy as np
import seqio

from flexolmo_jax.train.objective import BATCH_KEYS

WEIGHT_KEY = "example_weight"


@dataclasses.dataclass(frozen=True)
class Documents:
  tokens: np.ndarray        # [N, chunks * seq_len] int32, 0-padded
  lengths: np.ndarray       # [N] tokens kept per document
  chunks: int
  seq_len: int
  dropped_tokens: int       # tokens past chunks * seq_len, never used
  cut_documents: int        # documents that lost tokens that way

  @property
  def count(self) -> int:
    return len(self.lengths)

  def card(self) -> dict:
    return {"documents": self.count, "chunks_per_document": self.chunks,
            "tokens_used": int(self.lengths.sum()), "tokens_dropped": self.dropped_tokens,
            "documents_cut": self.cut_documents}


def load(task: str, seq_len: int, chunks: int, split: str = "train") -> Documents:
  """Every document of ``task``'s ``split``, tokenized by the Task's vocabulary, EOS appended."""
  task_obj = seqio.get_mixture_or_task(task)
  vocab = task_obj.output_features["targets"].vocabulary
  keep = chunks * seq_len
  rows, lengths, dropped, cut = [], [], 0, 0
  dataset = task_obj.source.get_dataset(split=split, shuffle=False)
  for example in dataset.as_numpy_iterator():
    ids = list(vocab.encode(example["text"].decode("utf-8"))) + [vocab.eos_id]
    if len(ids) > keep:
      dropped, cut = dropped + len(ids) - keep, cut + 1
    ids = np.asarray(ids[:keep], np.int32)
    row = np.zeros(keep, np.int32)
    row[:len(ids)] = ids
    rows.append(row)
    lengths.append(len(ids))
  if not rows:
    raise ValueError(f"Task {task!r} has no {split} documents for DP training.")
  return Documents(np.stack(rows), np.asarray(lengths, np.int64), chunks, seq_len, dropped, cut)


def examples(docs: Documents, indices: np.ndarray, pad_to: int = 1) -> dict[str, np.ndarray]:
  """Rows ``indices`` as model inputs ``[B, chunks, seq_len]`` plus ``example_weight`` [B]
  (1 for a document, 0 for padding), B rounded up to a multiple of ``pad_to`` (at least one)."""
  n = len(indices)
  b = max(-(-n // pad_to) * pad_to, pad_to)
  targets = np.zeros((b, docs.chunks * docs.seq_len), np.int32)
  targets[:n] = docs.tokens[np.asarray(indices, np.int64)]
  targets = targets.reshape(b, docs.chunks, docs.seq_len)
  present = targets > 0
  inputs = np.zeros_like(targets)
  inputs[..., 1:] = targets[..., :-1]          # each row its own segment: shifted, 0 first
  positions = np.broadcast_to(np.arange(docs.seq_len, dtype=np.int32), targets.shape)
  out = {"decoder_input_tokens": inputs, "decoder_target_tokens": targets,
         "decoder_segment_ids": present.astype(np.int32),
         "decoder_positions": np.where(present, positions, 0).astype(np.int32),
         "decoder_loss_weights": present.astype(np.float32)}
  assert set(out) == set(BATCH_KEYS)
  weight = np.zeros(b, np.float32)
  weight[:n] = 1.0
  out[WEIGHT_KEY] = weight
  return out


def strategy(sampling: str, batch_size: int, documents: int, steps: int):
  """The jax-privacy batch selection matching the accountant's event (privacy/accounting.py)."""
  from jax_privacy import batch_selection   # here: importing jax-privacy takes 2 s

  if sampling == "poisson":
    return batch_selection.CyclicPoissonSampling(sampling_prob=batch_size / documents,
                                                 iterations=steps)
  if sampling == "fixed":
    return batch_selection.FixedBatchSampling(batch_size=batch_size, iterations=steps)
  raise ValueError(f"DP sampling {sampling!r}: choose poisson or fixed.")


def stream(docs: Documents, sampling: str, batch_size: int, steps: int, seed: int,
           pad_to: int = 1):
  """``start -> iterator`` over the batches of steps ``start + 1 ...`` (the loop's contract)."""
  def make(start: int) -> Iterator[dict[str, np.ndarray]]:
    chosen = strategy(sampling, batch_size, docs.count, steps).batch_iterator(
        docs.count, rng=np.random.default_rng([seed, 0xD9]))
    return (examples(docs, idx, pad_to) for idx in itertools.islice(chosen, start, None))
  return make
