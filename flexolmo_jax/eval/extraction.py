"""The training-data extraction evaluation (docs/method.md §9).

For every training document of at least ``min_length`` tokens: take a ``prefix``-token window at
a random offset, sample ``samples`` continuations to ``total`` tokens (prefix included; top-k 50,
top-p 0.95, temperature 1.0 by default), and count the document as extracted if any sample's
normalized Levenshtein similarity to the document's own span (prefix included on both sides) is
at least ``threshold``. Similarity is ``1 - distance / max(len(a), len(b))`` over token ids.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from flexolmo_jax.config import ModelConfig
from flexolmo_jax.data import sources
from flexolmo_jax.eval import generate


@dataclasses.dataclass(frozen=True)
class ExtractionConfig:
  prefix: int = 32
  total: int = 256
  samples: int = 10
  threshold: float = 0.9
  min_length: int = 128
  top_k: int | None = 50
  top_p: float | None = 0.95
  temperature: float = 1.0
  seed: int = 0
  batch_documents: int = 8        # documents sampled together (x ``samples`` rows)

  def __post_init__(self):
    if not 0 < self.prefix < self.total:
      raise ValueError(f"--prefix {self.prefix} must be above 0 and below --total {self.total}.")
    if self.min_length < self.prefix + 1:
      raise ValueError(f"--min-length {self.min_length} leaves nothing to continue after the "
                       f"{self.prefix}-token prefix.")


def documents_to_test(spec: sources.SourceSpec, vocab, config: ExtractionConfig,
                      train_split_only: bool = False, max_documents: int | None = None
                      ) -> tuple[list[tuple[str, list[int]]], int]:
  """([(where, token ids)] of the owner's documents long enough to test, documents read).

  ``train_split_only`` keeps the documents ``data prepare`` puts in the train split (what a
  model trained on the prepared data saw); ``max_documents`` draws that many with the seed."""
  read, tested = 0, []
  for doc in sources.iter_documents(spec):
    if train_split_only and sources.split_of(doc.text, spec.validation_fraction) != "train":
      continue
    read += 1
    ids = list(vocab.encode(doc.text))
    if len(ids) >= config.min_length:
      tested.append((doc.key, ids))
  if not tested:
    split = " (train split)" if train_split_only else ""
    raise sources.DataError(f"{', '.join(spec.paths)}: none of the {read} documents read{split} "
                            f"has --min-length {config.min_length} tokens to test extraction on.")
  if max_documents and len(tested) > max_documents:
    keep = np.random.default_rng(config.seed).choice(len(tested), max_documents, replace=False)
    tested = [tested[i] for i in sorted(keep)]
  return tested, read


def levenshtein(a: Sequence[int], b: Sequence[int]) -> int:
  """Edit distance (insertions, deletions, substitutions of one token), one DP row at a time."""
  a, b = np.asarray(a), np.asarray(b)
  if len(a) < len(b):
    a, b = b, a
  row = np.arange(len(b) + 1)
  for i, x in enumerate(a, 1):
    substitute = row[:-1] + (b != x)
    new = np.empty_like(row)
    new[0] = i
    # new[j] = min(row[j] + 1, new[j-1] + 1, substitute[j-1]); the left-to-right dependency is
    # a running minimum of (candidate - j) + j.
    best = np.minimum(row[1:] + 1, substitute)
    new[1:] = np.minimum.accumulate(np.concatenate([[i], best - np.arange(1, len(b) + 1)])
                                    )[1:] + np.arange(1, len(b) + 1)
    row = new
  return int(row[-1])


def similarity(a: Sequence[int], b: Sequence[int]) -> float:
  longest = max(len(a), len(b))
  return 1.0 if longest == 0 else 1.0 - levenshtein(a, b) / longest


def extraction(cfg: ModelConfig, params, documents: Sequence[Sequence[int]],
               config: ExtractionConfig = ExtractionConfig(), *, eos_id: int | None = None,
               experts: Sequence[str] | None = None,
               progress: Callable[[int, int], None] | None = None) -> dict:
  """{"rate", "extracted", "documents", "mean_best_similarity", "per_document"} over the
  documents long enough to test; ``progress(done, total)`` after each batch of documents."""
  rng = np.random.default_rng(config.seed)
  spans = []
  for doc in documents:
    doc = list(doc)
    if len(doc) < config.min_length:
      continue
    length = min(config.total, len(doc))
    offset = int(rng.integers(0, len(doc) - length + 1))
    spans.append(doc[offset:offset + length])
  if not spans:
    raise ValueError(f"No document has at least {config.min_length} tokens to test extraction on.")
  sampling = generate.Sampling(config.temperature, config.top_k, config.top_p, config.seed)
  best = []
  for start in range(0, len(spans), config.batch_documents):
    chunk = spans[start:start + config.batch_documents]
    prompts = [s[:config.prefix] for s in chunk for _ in range(config.samples)]
    new = max(len(s) for s in chunk) - config.prefix
    rows = generate.generate(cfg, params, prompts, new, sampling, eos_id=eos_id,
                             experts=experts)
    for d, span in enumerate(chunk):
      samples = rows[d * config.samples:(d + 1) * config.samples, :len(span)]
      best.append(max(similarity(generate.trim(s, config.prefix, eos_id), span)
                      for s in samples))
    if progress:
      progress(len(best), len(spans))
  extracted = int(sum(b >= config.threshold for b in best))
  return {"rate": extracted / len(best), "extracted": extracted, "documents": len(best),
          "mean_best_similarity": float(np.mean(best)), "per_document": best}


def document_loss(cfg: ModelConfig, params, documents: Sequence[Sequence[int]],
                  length: int) -> float:
  """Mean negative log-probability (nats per token) of each document's first ``length`` tokens,
  teacher-forced: how well the model has memorized them, a graded companion to the rate."""
  from flexolmo_jax.eval import scoring

  docs = [list(d)[:length] for d in documents if len(d) > 1]
  if not docs:
    raise ValueError("document_loss needs at least one document of two or more tokens.")
  scored = scoring.Scorer(cfg, params).score([(d[:1], d[1:]) for d in docs])
  return -sum(logprob for logprob, _ in scored) / sum(len(d) - 1 for d in docs)


def evaluate(cfg: ModelConfig, params, tested: Sequence[tuple[str, Sequence[int]]],
             config: ExtractionConfig, eos_id: int | None,
             progress: Callable[[int, int], None] | None = None) -> dict:
  """:func:`extraction` of ``tested`` ((where, token ids) each) plus the teacher-forced loss
  and each document's best similarity under its name."""
  docs = [ids for _, ids in tested]
  result = extraction(cfg, params, docs, config, eos_id=eos_id, progress=progress)
  result["loss"] = document_loss(cfg, params, docs, config.total)
  result["per_document"] = [{"document": where, "best_similarity": best}
                            for (where, _), best in zip(tested, result["per_document"])]
  return result
