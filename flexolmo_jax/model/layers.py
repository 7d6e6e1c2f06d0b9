"""OLMo-2 building blocks with the exact semantics of docs/method.md §2.

Every parameter is an ``nnx.Param`` whose ``axes`` metadata names its logical axes
(see ``flexolmo_jax/sharding.py``); layers built with ``stack=L`` get a leading ``layers`` axis
so the decoder can scan one compiled layer body over them.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from flexolmo_jax import sharding
from flexolmo_jax.config import ModelConfig
from flexolmo_jax.model import attention


def dtype_of(name: str):
  return jnp.dtype(name)


def project(x, w, contract: int = 1, **dot_options):
  """``x [..., *in]`` times ``w [*in, *out]`` (``in`` the first ``contract`` axes of ``w``) as one
  2-D matrix product ``[tokens, prod(in)] @ [prod(in), prod(out)]``.

  The same product as an einsum over ``[batch, length, ...]``, but XLA:CPU gives the weight
  gradient of the 3-D einsum a layout with both operands transposed and a copy: for
  ``[8, 128, 768] @ [768, 3072]`` its gradient took 50 ms against 25 ms in 2-D (bench/RESULTS.md).
  The reshapes merge leading axes only, so they are free on every platform and keep a sharded
  batch axis sharded."""
  inner = w.shape[:contract]
  lead, out = x.shape[:x.ndim - contract], w.shape[contract:]
  size = math.prod(inner)
  y = jnp.matmul(x.reshape(-1, size), w.reshape(size, -1), **dot_options)
  return y.reshape(*lead, *out)


def make_param(rngs: nnx.Rngs | None, shape, axes, *, std: float | None, dtype, stack: int = 0):
  """A parameter with logical axes; ``std=None`` means ones (norm weights), else truncated normal."""
  if stack:
    shape, axes = (stack, *shape), ("layers", *axes)
  if std is None:
    value = jnp.ones(shape, dtype)
  else:
    init = jax.nn.initializers.truncated_normal(stddev=std, lower=-3.0, upper=3.0)
    value = init(rngs.params(), shape, jnp.float32).astype(dtype)
  return nnx.Param(value, axes=tuple(axes))


def rms_norm(x, weight, eps: float):
  """y = w * x / sqrt(mean(x^2) + eps), in fp32, weight applied before the cast back."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  return (weight.astype(jnp.float32) * y).astype(x.dtype)


class RMSNorm(nnx.Module):
  """RMSNorm over the trailing ``len(shape)`` axes (q/k norms cover the whole projection)."""

  def __init__(self, shape, axes, cfg: ModelConfig, *, stack: int = 0):
    self.eps = cfg.norm_eps
    self.weight = make_param(None, shape, axes, std=None, dtype=dtype_of(cfg.param_dtype),
                             stack=stack)

  def __call__(self, x):
    w = self.weight[...]
    n = w.ndim
    flat = x.reshape(*x.shape[: x.ndim - n], -1)
    return rms_norm(flat, w.reshape(-1), self.eps).reshape(x.shape)


def rope_cos_sin(positions, head_dim: int, theta: float):
  """cos/sin tables [..., head_dim] in fp32 for half-split ("rotate_half") RoPE."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x_bthd, cos_btd, sin_btd):
  """x*cos + rotate_half(x)*sin with rotate_half(x) = cat(-x[D/2:], x[:D/2]); math in fp32."""
  half = x_bthd.shape[-1] // 2
  x = x_bthd.astype(jnp.float32)
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos, sin = cos_btd[:, :, None, :], sin_btd[:, :, None, :]
  return (x * cos + rotated * sin).astype(x_bthd.dtype)


class Attention(nnx.Module):
  """q = RMSNorm_q(x Wq), k = RMSNorm_k(x Wk) over the whole projection, then RoPE; GQA allowed."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, *, stack: int = 0):
    d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    pd, std = dtype_of(cfg.param_dtype), cfg.init_std
    self.cfg = cfg
    self.q_proj = make_param(rngs, (d, h, hd), ("embed", "heads", "kv"), std=std, dtype=pd, stack=stack)
    self.k_proj = make_param(rngs, (d, kv, hd), ("embed", "heads", "kv"), std=std, dtype=pd, stack=stack)
    self.v_proj = make_param(rngs, (d, kv, hd), ("embed", "heads", "kv"), std=std, dtype=pd, stack=stack)
    self.o_proj = make_param(rngs, (h, hd, d), ("heads", "kv", "embed"), std=std, dtype=pd, stack=stack)
    self.q_norm = RMSNorm((h, hd), ("heads", "kv"), cfg, stack=stack)
    self.k_norm = RMSNorm((kv, hd), ("heads", "kv"), cfg, stack=stack)

  def __call__(self, x_btd, cos, sin, mask: attention.Mask, kv=None):
    """With ``kv = (k_cache, v_cache, index)`` ([B, S, kv_heads, head_dim] each) the new keys and
    values are written at ``index`` and attention runs over the whole cache (``mask`` then covers
    the cache's S keys); returns ``(out, (k_cache, v_cache))``."""
    cfg = self.cfg
    dt = dtype_of(cfg.dtype)
    x = x_btd.astype(dt)
    # Kept as einsums: through ``project`` (then the norms over heads x head_dim) the tiny
    # model's forward and backward took 22 ms instead of 13 (bench/RESULTS.md).
    q = self.q_norm(jnp.einsum("btd,dhk->bthk", x, self.q_proj[...].astype(dt)))
    k = self.k_norm(jnp.einsum("btd,dhk->bthk", x, self.k_proj[...].astype(dt)))
    v = jnp.einsum("btd,dhk->bthk", x, self.v_proj[...].astype(dt))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    q = sharding.constrain(q, ("batch", "length", "heads", "kv"))
    if kv is not None:
      k_cache, v_cache, index = kv
      k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, index, 0, 0))
      v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, index, 0, 0))
      out = attention.attend(q, k.astype(dt), v.astype(dt), mask, cfg.attention, cached=True)
      return self._project(out), (k, v)
    return self._project(attention.attend(q, k, v, mask, cfg.attention))

  def _project(self, out_bthk):
    dt = out_bthk.dtype
    return project(out_bthk, self.o_proj[...].astype(dt), contract=2)


def swiglu(x, w_gate, w_up, w_down):
  """down(silu(x Wgate) * (x Wup)) for x [..., d] and weights [d, f], [d, f], [f, d]."""
  h = jax.nn.silu(project(x, w_gate)) * project(x, w_up)
  return project(h, w_down)


class FeedForward(nnx.Module):
  """The dense SwiGLU FFN of the public model."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, *, stack: int = 0):
    d, f, pd, std = cfg.d_model, cfg.d_ff, dtype_of(cfg.param_dtype), cfg.init_std
    self.dtype = dtype_of(cfg.dtype)
    self.gate_proj = make_param(rngs, (d, f), ("embed", "mlp"), std=std, dtype=pd, stack=stack)
    self.up_proj = make_param(rngs, (d, f), ("embed", "mlp"), std=std, dtype=pd, stack=stack)
    self.down_proj = make_param(rngs, (f, d), ("mlp", "embed"), std=std, dtype=pd, stack=stack)

  def __call__(self, x_btd):
    dt = self.dtype
    return swiglu(x_btd.astype(dt), self.gate_proj[...].astype(dt), self.up_proj[...].astype(dt),
                  self.down_proj[...].astype(dt))
