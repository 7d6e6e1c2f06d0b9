"""Text generation with a KV cache: greedy, or sampling with temperature, top-k and top-p.

The prompt (one length for the whole batch) is run once to fill the cache; each new token then
costs one single-position step over the cache. Sampling is seeded: the key of step ``i`` is
``fold_in(key(seed), i)``, so a run is reproducible and independent of the batch's other rows'
lengths. A row stops at ``eos_id`` (the rest of it is ``pad_id``).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flexolmo_jax.config import ModelConfig
from flexolmo_jax.model.transformer import KVCache, pure_model


@dataclasses.dataclass(frozen=True)
class Sampling:
  temperature: float = 0.0      # 0: greedy (arg-max)
  top_k: int | None = None      # keep the k most likely tokens
  top_p: float | None = None    # keep the smallest set whose probability reaches p
  seed: int = 0

  def __post_init__(self):
    if not (math.isfinite(self.temperature) and self.temperature >= 0):
      raise ValueError(f"temperature={self.temperature} must be a number >= 0.")
    if self.top_k is not None and self.top_k < 1:
      raise ValueError(f"top_k={self.top_k} must be >= 1.")
    if self.top_p is not None and not 0 < self.top_p <= 1:
      raise ValueError(f"top_p={self.top_p} must be in (0, 1].")


def filter_logits(logits_bv, top_k: int | None, top_p: float | None):
  """-inf outside the top-k tokens and outside the top-p nucleus (the token that crosses p is
  kept, so at least one token always remains)."""
  neg = jnp.finfo(logits_bv.dtype).min
  if top_k is not None and top_k < logits_bv.shape[-1]:
    kth = jnp.sort(logits_bv, axis=-1)[:, -top_k][:, None]
    logits_bv = jnp.where(logits_bv >= kth, logits_bv, neg)
  if top_p is not None and top_p < 1.0:
    logits_bv = nucleus(logits_bv, top_p)
  return logits_bv


def nucleus(logits_bv, top_p):
  """-inf outside each row's top-p nucleus (``top_p`` may be traced; the token that crosses p is
  kept, so at least one token remains)."""
  order = jnp.argsort(-logits_bv, axis=-1)
  probs = jax.nn.softmax(jnp.take_along_axis(logits_bv, order, -1), axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs           # mass of the more likely tokens
  keep_sorted = before < top_p
  keep = jnp.zeros_like(keep_sorted).at[jnp.arange(order.shape[0])[:, None], order].set(
      keep_sorted)
  return jnp.where(keep, logits_bv, jnp.finfo(logits_bv.dtype).min)


def choose(logits_bv, sampling: Sampling, key):
  if sampling.temperature == 0:
    return jnp.argmax(logits_bv, axis=-1)
  logits = filter_logits(logits_bv / sampling.temperature, sampling.top_k, sampling.top_p)
  return jax.random.categorical(key, logits, axis=-1)


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "eos_id", "pad_id", "experts"))
def _step(params, tokens, cache, key, done, *, cfg, sampling, eos_id, pad_id, experts):
  """Runs ``tokens`` over the cache and chooses each row's next token (compiled once per shape
  and setting, shared by every call)."""
  logits, _, cache = pure_model(cfg)(params, tokens, cache=cache, experts=experts)
  nxt = choose(logits[:, -1], sampling, key).astype(jnp.int32)
  if eos_id is not None:
    nxt = jnp.where(done, pad_id, nxt)
    done = done | (nxt == eos_id)
  return nxt, cache, done


def generate(cfg: ModelConfig, params, prompts, max_new_tokens: int,
             sampling: Sampling = Sampling(), *, eos_id: int | None = None, pad_id: int = 0,
             experts: Sequence[str] | None = None, cache_len: int | None = None) -> np.ndarray:
  """``[B, P + max_new_tokens]`` tokens: the prompts ``[B, P]`` and their continuations.
  ``cache_len`` (at least P + max_new_tokens) sizes the KV cache: callers with prompts of many
  lengths pass a few bucketed sizes, so the one-token step compiles once per bucket; positions
  past the written ones are masked, so the tokens do not change."""
  prompts = np.asarray(prompts, np.int32)
  if prompts.ndim != 2 or prompts.shape[1] == 0:
    raise ValueError(f"prompts must be [batch, length > 0], got shape {prompts.shape}.")
  b, p = prompts.shape
  total = p + max_new_tokens
  if total > cfg.max_seq_len:
    raise ValueError(f"prompt {p} + {max_new_tokens} new tokens exceed max_seq_len "
                     f"{cfg.max_seq_len}.")
  experts = tuple(experts) if experts else None
  out = np.full((b, total), pad_id, np.int32)
  out[:, :p] = prompts
  cache = KVCache.empty(cfg, b, max(total, cache_len or 0))
  done = jnp.zeros((b,), bool)
  tokens = jnp.asarray(prompts)
  root = jax.random.key(sampling.seed)
  rule = dataclasses.replace(sampling, seed=0)   # the seed lives in the keys, not the program
  for i in range(max_new_tokens):
    nxt, cache, done = _step(params, tokens, cache, jax.random.fold_in(root, i), done, cfg=cfg,
                             sampling=rule, eos_id=eos_id, pad_id=pad_id, experts=experts)
    out[:, p + i] = np.asarray(nxt)
    tokens = nxt[:, None]
    if eos_id is not None and bool(jnp.all(done)):
      break
  return out


def trim(row: Sequence[int], prompt_len: int, eos_id: int | None) -> list[int]:
  """The prompt and continuation up to and including the first ``eos_id``."""
  row = list(row)
  if eos_id is not None and eos_id in row[prompt_len:]:
    return row[:row.index(eos_id, prompt_len) + 1]
  return row
