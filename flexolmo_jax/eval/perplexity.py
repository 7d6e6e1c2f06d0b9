"""Validation loss per domain of any saved model (``flexolmo eval``).

A *scorer* (model/logprobs.py) gives the targets' log-probabilities; the loss of a domain is
the mean negative log-probability over its validation split (nats per token; per byte
with the byte vocabulary). Models are opened by the kind their manifest names:

- ``public`` / ``dense``: a dense model (the public model, a dense baseline, a soup);
- ``merged``: the FlexOlmo MoE, over all its experts or a selection (``experts`` / ``exclude``);
- ``btm``: the BTM ensemble of dense models (baselines/btm.py).
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping

import numpy as np
import seqio

from flexolmo_jax import distributed
from flexolmo_jax.baselines import btm
from flexolmo_jax.checkpoint import saved, store
from flexolmo_jax.data.byte_ids import BYTE_OFFSET
from flexolmo_jax.model.logprobs import Scorer, model_scorer


def open_model(path: str, experts=None, exclude=None, dtype: str | None = None
               ) -> tuple[Scorer, dict]:
  """(scorer, description) for any saved model; ``experts`` / ``exclude`` opt experts in or out."""
  path = store.saved_dir(path)
  manifest = store.read_manifest(path)
  if manifest.get("kind") == "btm":
    if experts or exclude:
      raise ValueError(f"--experts / --exclude apply to merged models; {path} is 'btm'.")
    return btm.btm_scorer(path, manifest, dtype), {"kind": "btm"}
  cfg, params, manifest = saved.open_saved(path, experts, exclude, dtype)
  description = {"kind": manifest["kind"]}
  if cfg.is_moe:
    description.update(experts=list(cfg.experts), top_k=cfg.top_k)
  return model_scorer(cfg, params), description


def target_bytes(vocab, targets_bt, weights_bt) -> int:
  """UTF-8 bytes of the weighted target tokens (EOS and padding have none)."""
  if vocab is None:
    return 0
  if isinstance(vocab, seqio.ByteVocabulary):
    return int(np.sum((weights_bt > 0) & (targets_bt >= BYTE_OFFSET)
                      & (targets_bt < BYTE_OFFSET + 256)))
  return sum(len(vocab.decode([int(t) for t, w in zip(row, wrow) if w > 0]).encode("utf-8"))
             for row, wrow in zip(targets_bt, weights_bt))


def domain_stats(scorer: Scorer, batches: Iterable[Mapping[str, np.ndarray]],
                 max_batches: int | None = None, vocab=None, name: str = "data") -> dict:
  """{"loss" (nats/token), "perplexity", "bits_per_byte", "tokens", "bytes"} over the
  loss-weighted target tokens (``bits_per_byte`` needs ``vocab``).

  With several processes, ``batches`` is this process's shard of the stream (``lm_batches``
  reads one per host by default), scored on its own devices; the sums are added across processes,
  so every process returns the numbers of the whole stream."""
  nll = weight = 0.0
  nbytes = 0
  for i, batch in enumerate(batches):
    if max_batches is not None and i >= max_batches:
      break
    w = np.asarray(batch["decoder_loss_weights"], np.float64)
    nll -= float(np.sum(np.asarray(scorer(batch), np.float64) * w))
    weight += float(np.sum(w))
    nbytes += target_bytes(vocab, np.asarray(batch["decoder_target_tokens"]), w)
  nll, weight, nbytes = distributed.sum_across_processes([nll, weight, nbytes])
  nbytes = int(nbytes)
  if not weight:
    raise ValueError(f"{name}: no validation tokens to evaluate on (the validation split is "
                     "empty).")
  return {"loss": nll / weight, "perplexity": math.exp(min(nll / weight, 700.0)),
          "bits_per_byte": nll / math.log(2) / nbytes if nbytes else None,
          "tokens": int(weight), "bytes": nbytes}


def evaluate(path: str, data: Mapping[str, Iterable], experts=None, exclude=None,
             dtype: str | None = None, max_batches: int | None = None) -> dict[str, float]:
  """{domain: loss} for the model at ``path`` over ``data`` ({domain: batch iterable})."""
  return {name: stats["loss"] for name, stats in
          evaluate_stats(path, data, experts, exclude, dtype, max_batches).items()}


def evaluate_stats(path: str, data: Mapping[str, Iterable], experts=None, exclude=None,
                   dtype: str | None = None, max_batches: int | None = None,
                   vocab=None) -> dict[str, dict]:
  """{domain: domain_stats} for the model at ``path``."""
  scorer, _ = open_model(path, experts, exclude, dtype)
  return {name: domain_stats(scorer, batches, max_batches, vocab, name)
          for name, batches in data.items()}
