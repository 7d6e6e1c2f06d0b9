"""Greedy decoding, the oracle the Hugging Face export is checked against.

Each step runs the whole fixed-length window (one compiled program, causal attention makes the
not-yet-written tail irrelevant) and appends the arg-max of the last written position. No cache:
this is for checks and short samples, not serving.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flexolmo_jax.config import ModelConfig
from flexolmo_jax.model.transformer import pure_model


def greedy(cfg: ModelConfig, params, prompt: Sequence[int], max_new_tokens: int,
           eos_id: int | None = None) -> list[int]:
  """The prompt followed by up to ``max_new_tokens`` greedy tokens (stopping after ``eos_id``)."""
  length = len(prompt) + max_new_tokens
  if length > cfg.max_seq_len:
    raise ValueError(f"prompt {len(prompt)} + {max_new_tokens} new tokens exceed max_seq_len "
                     f"{cfg.max_seq_len}.")
  model = pure_model(cfg)

  @jax.jit
  def next_token(params, tokens, last):
    logits, _ = model(params, tokens[None])
    return jnp.argmax(logits[0, last])

  tokens = np.zeros(length, np.int32)
  tokens[:len(prompt)] = prompt
  n = len(prompt)
  while n < length:
    tok = int(next_token(params, tokens, n - 1))
    tokens[n] = tok
    n += 1
    if eos_id is not None and tok == eos_id:
      break
  return tokens[:n].tolist()
