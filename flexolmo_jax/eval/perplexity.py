"""Validation loss per domain of any saved model (``flexolmo eval``).

A *scorer* turns a packed batch into per-token log-probabilities of the targets; the loss of a
domain is the mean negative log-probability over its validation split (nats per token; per byte
with the byte vocabulary). Models are opened by the kind their manifest names:

- ``public`` / ``dense``: a dense model (the public model, a dense baseline, a soup);
- ``merged``: the FlexOlmo MoE, over all its experts or a selection (``experts`` / ``exclude``);
- ``btm``: the BTM ensemble of dense models (eval/baselines.py).
"""
from __future__ import annotations

import functools
import math
import os
from typing import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import seqio

from flexolmo_jax import distributed
from flexolmo_jax.checkpoint import merge as merge_lib
from flexolmo_jax.checkpoint import store
from flexolmo_jax.config import PUBLIC, ModelConfig
from flexolmo_jax.convert.hf import BYTE_OFFSET
from flexolmo_jax.model.transformer import pure_model
from flexolmo_jax.train import loop

Scorer = Callable[[Mapping[str, np.ndarray]], jax.Array]   # batch -> [B, T] target log-probs


def target_logprobs(logits_btv, targets_bt):
  logz = jax.nn.logsumexp(logits_btv, axis=-1)
  return jnp.take_along_axis(logits_btv, targets_bt[..., None], -1)[..., 0] - logz


@functools.partial(jax.jit, static_argnums=0)
def _score(cfg: ModelConfig, params, batch):
  logits, _ = loop.run_on_batch(pure_model(cfg), params, batch)
  return target_logprobs(logits, batch["decoder_target_tokens"])


def program_config(cfg: ModelConfig) -> ModelConfig:
  """``cfg`` with the non-public experts renamed by position: models that differ only in which
  owners they hold (an opt-out, ``public + X``) share one compiled program."""
  if not cfg.is_moe:
    return cfg
  return cfg.replace(experts=tuple(n if n == PUBLIC else f"expert_{i}"
                                   for i, n in enumerate(cfg.experts)))


def padded_rows(score: Callable[[Mapping[str, np.ndarray]], jax.Array]) -> Scorer:
  """A scorer that pads short batches (the last of a split) to the widest seen so far, with zero
  loss weight, and cuts the result back: every batch of an evaluation runs one program."""
  widest = 0

  def scorer(batch):
    nonlocal widest
    rows = len(batch["decoder_target_tokens"])
    widest = max(widest, rows)
    if rows < widest:
      pad = lambda v: np.pad(np.asarray(v), [(0, widest - rows)] + [(0, 0)] * (np.ndim(v) - 1))
      batch = {k: pad(v) for k, v in batch.items()}
    return score(batch)[:rows]

  return scorer


def model_scorer(cfg: ModelConfig, params) -> Scorer:
  """Target log-probs of the model; models of equal shape reuse one compiled program."""
  key = program_config(cfg)
  return padded_rows(lambda batch: _score(key, params, batch))


def load_dense(path: str, dtype: str | None = None) -> tuple[ModelConfig, dict, dict]:
  """(config, params, manifest) of a ``public`` or ``dense`` model directory."""
  manifest = store.read_manifest(path)
  if manifest.get("kind") not in ("public", "dense"):
    raise ValueError(f"{path} holds a {manifest.get('kind')!r} checkpoint, not a dense model.")
  cfg = store.config_from_json(manifest["config"], os.path.join(path, store.MANIFEST))
  if dtype:
    cfg = cfg.replace(dtype=dtype)
  store.recorded_files(path, manifest)
  params = store.load_params(path, pure_model(cfg).abstract.to_pure_dict())
  return cfg, params, manifest


def load_model(path: str, experts=None, exclude=None, dtype: str | None = None
               ) -> tuple[ModelConfig, dict, dict]:
  """(config, params, manifest) of a public, dense or merged model (experts opted in or out)."""
  path = store.saved_dir(path)
  manifest = store.read_manifest(path)
  kind = manifest.get("kind")
  if kind != "merged" and (experts or exclude):
    raise ValueError(f"--experts / --exclude apply to merged models; {path} is {kind!r}.")
  if kind == "merged":
    cfg, params = merge_lib.load_merged(path, experts, exclude, dtype=dtype)
    return cfg, params, manifest
  if kind in ("public", "dense"):
    return load_dense(path, dtype)
  raise ValueError(f"{path}: a {kind!r} checkpoint cannot be run on its own"
                   + ("; merge it with its public model first (flexolmo merge)."
                      if kind == "expert" else "."))


def open_model(path: str, experts=None, exclude=None, dtype: str | None = None
               ) -> tuple[Scorer, dict]:
  """(scorer, description) for any saved model; ``experts`` / ``exclude`` opt experts in or out."""
  path = store.saved_dir(path)
  manifest = store.read_manifest(path)
  if manifest.get("kind") == "btm":
    if experts or exclude:
      raise ValueError(f"--experts / --exclude apply to merged models; {path} is 'btm'.")
    from flexolmo_jax.eval import baselines
    return baselines.btm_scorer(path, manifest, dtype), {"kind": "btm"}
  cfg, params, manifest = load_model(path, experts, exclude, dtype)
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


def domain_loss(scorer: Scorer, batches: Iterable[Mapping[str, np.ndarray]],
                max_batches: int | None = None) -> float:
  """Mean negative log-probability over the loss-weighted target tokens."""
  return domain_stats(scorer, batches, max_batches)["loss"]


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
