"""Memory arithmetic for the big presets (docs/scaling.md): parameters, optimizer state and
caches, from a ModelConfig alone. Activations depend on batch, length and remat and are left out.

Expert training (docs/method.md §4) keeps the public model frozen (no gradient, no optimizer state)
and trains, per layer, one SwiGLU FFN, one router row and one negative bias, with fp32 AdamW
(two moments) and fp32 gradients. Inference holds every parameter in the compute dtype plus the
key/value cache.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from flexolmo_jax.config import ModelConfig

GB = 1e9
ADAM_MOMENTS = 2


def dtype_bytes(name: str) -> int:
  return np.dtype(name).itemsize if name != "bfloat16" else 2


def expert_trainable_params(cfg: ModelConfig) -> int:
  """One owner's expert: per layer, gate/up/down (3 d f), a router row (d), a negative bias."""
  return cfg.n_layers * (3 * cfg.d_model * cfg.d_ff + cfg.d_model + 1)


@dataclasses.dataclass(frozen=True)
class Budget:
  rows: dict[str, float]     # what -> bytes
  devices: int               # the parameters and states are sharded over this many (fsdp)

  @property
  def total(self) -> float:
    return sum(self.rows.values())

  @property
  def per_device(self) -> float:
    return self.total / self.devices


def expert_training(cfg: ModelConfig, fsdp: int) -> Budget:
  """Frozen public model in ``param_dtype``; the expert's fp32 params, gradients, AdamW moments;
  all sharded over ``fsdp`` devices (spec 4: frozen leaves get no update and no state)."""
  trainable = expert_trainable_params(cfg)
  return Budget({
      "frozen public model": cfg.num_params() * dtype_bytes(cfg.param_dtype),
      "expert parameters (fp32)": trainable * 4,
      "expert gradients (fp32)": trainable * 4,
      "AdamW moments (fp32)": trainable * 4 * ADAM_MOMENTS,
  }, fsdp)


def kv_cache_bytes_per_token(cfg: ModelConfig) -> int:
  return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * dtype_bytes(cfg.dtype)


def inference(cfg: ModelConfig, devices: int, cached_tokens: int) -> Budget:
  """Every parameter in the compute dtype and a key/value cache of ``cached_tokens`` (all
  sequences of a batch together), sharded over ``devices``."""
  return Budget({
      "parameters": cfg.num_params() * dtype_bytes(cfg.dtype),
      "KV cache": kv_cache_bytes_per_token(cfg) * cached_tokens,
  }, devices)
