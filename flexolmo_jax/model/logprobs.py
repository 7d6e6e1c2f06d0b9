"""Log-probabilities a model gives the targets of packed batches: what every evaluation scores.

A *scorer* turns a packed batch into per-token log-probabilities of its targets ``[B, T]``.
"""
from __future__ import annotations

import functools
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from flexolmo_jax.config import ModelConfig
from flexolmo_jax.experts import PUBLIC
from flexolmo_jax.model.transformer import pure_model, run_on_batch

Scorer = Callable[[Mapping[str, np.ndarray]], jax.Array]   # batch -> [B, T] target log-probs


def target_logprobs(logits_btv, targets_bt):
  logz = jax.nn.logsumexp(logits_btv, axis=-1)
  return jnp.take_along_axis(logits_btv, targets_bt[..., None], -1)[..., 0] - logz


@functools.partial(jax.jit, static_argnums=0)
def _score(cfg: ModelConfig, params, batch):
  logits, _ = run_on_batch(pure_model(cfg), params, batch)
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
