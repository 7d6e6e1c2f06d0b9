"""Scaled dot-product attention, causal within packed segments, behind one signature.

Every implementation takes ``q [B, T, H, D]``, ``k, v [B, S, KV, D]`` (grouped-query: H is a
multiple of KV) and a :class:`Mask`, and returns ``[B, T, H, D]``:

- ``reference``: the plain formula with a ``[B, H, T, S]`` score tensor; the oracle of the tests.
- ``blocked``: flash-style in plain JAX with its own VJP. Queries and keys go in blocks with an
  online softmax, blocks above the causal diagonal are skipped, and the backward pass recomputes
  the probabilities from the saved log-sum-exp, so no ``[T, S]`` tensor exists in either pass:
  memory is linear in the sequence length. The portable default.
- ``cudnn``: cuDNN's fused kernel through ``jax.nn.dot_product_attention`` (GPU).
- ``splash``: the Pallas splash-attention kernel (TPU), under ``shard_map`` when a mesh is active.

``auto`` picks per platform: splash on TPU, cuDNN on GPU, blocked elsewhere, and blocked
wherever the fused kernels do not apply (a KV cache, lengths the TPU kernel cannot tile).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from flexolmo_jax import sharding

IMPLEMENTATIONS = ("auto", "reference", "blocked", "cudnn", "splash")
BLOCK_Q = 256
BLOCK_K = 256
# A finite "minus infinity": a row whose keys so far are all masked keeps finite statistics, and
# its first allowed key wipes them (exp(NEG - m) == 0).
NEG = -0.7 * float(jnp.finfo(jnp.float32).max)


class Mask(NamedTuple):
  """Query i may see key j when their segments match and ``q_offset + i >= j``.

  Training has ``q_offset = 0`` and the packed segment ids on both sides; decoding with a cache
  has one segment and ``q_offset`` = the cache index.
  """

  q_segments: jax.Array    # [B, T] int
  kv_segments: jax.Array   # [B, S] int
  q_offset: jax.Array      # int32 scalar

  def dense(self):
    """The [B, 1, T, S] booleans (what ``reference`` uses)."""
    t, s = self.q_segments.shape[1], self.kv_segments.shape[1]
    same = self.q_segments[:, :, None] == self.kv_segments[:, None, :]
    causal = (self.q_offset + jnp.arange(t))[:, None] >= jnp.arange(s)[None, :]
    return (same & causal)[:, None]


def check_implementation(name: str) -> None:
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"attention={name!r}; choose from {IMPLEMENTATIONS}.")


def resolve(name: str, q_len: int, kv_len: int, cached: bool, where: str | None = None,
            dtype=None) -> str:
  """The implementation ``name`` means for these shapes on platform ``where`` (default: the
  platform being traced for); cuDNN's fused kernel takes 16-bit inputs only."""
  check_implementation(name)
  if name != "auto":
    return name
  where = where or sharding.platform()
  if cached:
    return "blocked"
  if where == "tpu" and q_len == kv_len and q_len % 128 == 0:
    return "splash"
  if where == "gpu" and dtype is not None and jnp.dtype(dtype).itemsize == 2:
    return "cudnn"
  return "blocked"


def attend(q, k, v, mask: Mask, implementation: str = "auto", *, cached: bool = False):
  """softmax(q k^T / sqrt(D) masked) v with the chosen implementation (see the module doc)."""
  name = resolve(implementation, q.shape[1], k.shape[1], cached, dtype=q.dtype)
  if name == "reference":
    return reference(q, k, v, mask)
  if name == "blocked":
    return blocked(q, k, v, mask)
  if name == "cudnn":
    return fused(q, k, v, mask, "cudnn")
  from flexolmo_jax.model import splash   # Pallas TPU: imported only where it runs
  return splash.attend(q, k, v, mask)


def _grouped(q, kv_heads: int):
  b, t, h, d = q.shape
  return q.reshape(b, t, kv_heads, h // kv_heads, d)


def reference(q, k, v, mask: Mask):
  """The formula as written: fp32 scores and softmax over every key, masked."""
  b, t, h, d = q.shape
  scores = jnp.einsum("bqngd,bsnd->bngqs", _grouped(q, k.shape[2]), k,
                      preferred_element_type=jnp.float32) * (d ** -0.5)
  scores = jnp.where(mask.dense()[:, :, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
  return jnp.einsum("bngqs,bsnd->bqngd", probs, v).reshape(b, t, h, d)


def fused(q, k, v, mask: Mask, implementation: str):
  """``jax.nn.dot_product_attention`` (cuDNN on GPU; ``"xla"`` checks this wrapper on CPU)."""
  return jax.nn.dot_product_attention(q, k, v, mask=mask.dense(), is_causal=False,
                                      implementation=implementation)


# ----------------------------------------------------------------------------- blocked


class _Blocks(NamedTuple):
  bq: int
  bk: int
  nq: int
  nk: int


def _blocks(t: int, s: int, block_q: int, block_k: int) -> _Blocks:
  bq, bk = min(block_q, t), min(block_k, s)
  return _Blocks(bq, bk, -(-t // bq), -(-s // bk))


def _pad(x, axis: int, size: int, value=0):
  extra = size - x.shape[axis]
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def blocked(q, k, v, mask: Mask, block_q: int | None = None, block_k: int | None = None):
  """Flash-style attention in plain JAX (see the module doc); equal to :func:`reference`.

  Queries and keys that fit one block each are the reference computation itself (its one
  block-sized score tensor is what a block would hold)."""
  b, t, h, d = q.shape
  s, kv = k.shape[1], k.shape[2]
  blocks = _blocks(t, s, block_q or BLOCK_Q, block_k or BLOCK_K)
  if blocks.nq == blocks.nk == 1:
    return reference(q, k, v, mask)
  tp, sp = blocks.nq * blocks.bq, blocks.nk * blocks.bk
  # Padded queries sit in no segment (-1) and are cut off; padded keys lie past every real
  # query's position, so causality hides them.
  qg = _pad(_grouped(q * jnp.asarray(d ** -0.5, q.dtype), kv), 1, tp)
  kp, vp = _pad(k, 1, sp), _pad(v, 1, sp)
  qseg = _pad(mask.q_segments.astype(jnp.int32), 1, tp, -1)
  kseg = _pad(mask.kv_segments.astype(jnp.int32), 1, sp, -2)
  out = _flash(blocks, qg, kp, vp, qseg, kseg, jnp.asarray(mask.q_offset, jnp.int32))
  return out[:, :t].reshape(b, t, h, d)


def _allowed(qseg, kseg, qpos, kpos):
  """[B, 1, 1, bq, bk] visibility of a query block to a key block."""
  same = qseg[:, :, None] == kseg[:, None, :]
  return (same & (qpos[:, None] >= kpos[None, :]))[:, None, None]


def _scores(q_blk, k_blk, allowed):
  s = jnp.einsum("bqngd,bknd->bngqk", q_blk, k_blk, preferred_element_type=jnp.float32)
  return jnp.where(allowed, s, NEG)


def _key_blocks_seen(blocks: _Blocks, i, q_offset):
  """How many key blocks the query block ``i`` sees (those left of its last query's position)."""
  last = q_offset + (i + 1) * blocks.bq - 1
  return jnp.clip(last // blocks.bk + 1, 0, blocks.nk)


def _first_query_block(blocks: _Blocks, j, q_offset):
  """The first query block that sees key block ``j``."""
  return jnp.clip((j * blocks.bk - q_offset) // blocks.bq, 0, blocks.nq)


def _slice(x, start, size, axis=1):
  return jax.lax.dynamic_slice_in_dim(x, start, size, axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(blocks, q, k, v, qseg, kseg, q_offset):
  return _flash_forward(blocks, q, k, v, qseg, kseg, q_offset)[0]


def _flash_forward(blocks: _Blocks, q, k, v, qseg, kseg, q_offset):
  """Online softmax over key blocks for each query block: (out [B, Tp, KV, G, D], lse)."""
  bq, bk = blocks.bq, blocks.bk
  b, _, n, g, d = q.shape

  def query_block(i):
    q_blk, qs = _slice(q, i * bq, bq), _slice(qseg, i * bq, bq)
    qpos = q_offset + i * bq + jnp.arange(bq)

    def key_block(j, carry):
      m, l, acc = carry
      kpos = j * bk + jnp.arange(bk)
      s = _scores(q_blk, _slice(k, j * bk, bk), _allowed(qs, _slice(kseg, j * bk, bk), qpos, kpos))
      m_new = jnp.maximum(m, s.max(-1))
      p = jnp.exp(s - m_new[..., None])
      alpha = jnp.exp(m - m_new)
      pv = jnp.einsum("bngqk,bknd->bngqd", p.astype(v.dtype), _slice(v, j * bk, bk),
                      preferred_element_type=jnp.float32)
      return m_new, l * alpha + p.sum(-1), acc * alpha[..., None] + pv

    init = (jnp.full((b, n, g, bq), NEG, jnp.float32), jnp.zeros((b, n, g, bq), jnp.float32),
            jnp.zeros((b, n, g, bq, d), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, _key_blocks_seen(blocks, i, q_offset), key_block, init)
    out = (acc / l[..., None]).astype(q.dtype)
    return jnp.einsum("bngqd->bqngd", out), m + jnp.log(l)

  out, lse = jax.lax.map(query_block, jnp.arange(blocks.nq))
  out = jnp.moveaxis(out, 0, 1).reshape(q.shape)                  # [B, Tp, KV, G, D]
  lse = jnp.moveaxis(lse, 0, 3).reshape(b, n, g, -1)               # [B, KV, G, Tp]
  return out, lse


def _flash_fwd(blocks, q, k, v, qseg, kseg, q_offset):
  out, lse = _flash_forward(blocks, q, k, v, qseg, kseg, q_offset)
  return out, (q, k, v, qseg, kseg, q_offset, out, lse)


def _flash_bwd(blocks, residuals, d_out):
  q, k, v, qseg, kseg, q_offset, out, lse = residuals
  bq, bk = blocks.bq, blocks.bk
  # delta_i = sum_j P_ij dP_ij = d_out_i . out_i
  delta = jnp.einsum("bqngd,bqngd->bngq", d_out.astype(jnp.float32), out.astype(jnp.float32))

  def probs_and_grad(i, j):
    """P and dS of query block i against key block j: [B, KV, G, bq, bk] each."""
    q_blk, do_blk = _slice(q, i * bq, bq), _slice(d_out, i * bq, bq)
    qpos, kpos = q_offset + i * bq + jnp.arange(bq), j * bk + jnp.arange(bk)
    allowed = _allowed(_slice(qseg, i * bq, bq), _slice(kseg, j * bk, bk), qpos, kpos)
    p = jnp.exp(_scores(q_blk, _slice(k, j * bk, bk), allowed) - _slice(lse, i * bq, bq, 3)[..., None])
    dp = jnp.einsum("bqngd,bknd->bngqk", do_blk, _slice(v, j * bk, bk),
                    preferred_element_type=jnp.float32)
    return p, p * (dp - _slice(delta, i * bq, bq, 3)[..., None]), q_blk, do_blk

  def dq_block(i):
    def key_block(j, dq):
      _, ds, _, _ = probs_and_grad(i, j)
      return dq + jnp.einsum("bngqk,bknd->bqngd", ds, _slice(k, j * bk, bk).astype(jnp.float32))
    zero = jnp.zeros((q.shape[0], bq, *q.shape[2:]), jnp.float32)
    return jax.lax.fori_loop(0, _key_blocks_seen(blocks, i, q_offset), key_block, zero)

  def dkv_block(j):
    def query_block(i, carry):
      dk, dv = carry
      p, ds, q_blk, do_blk = probs_and_grad(i, j)
      dv = dv + jnp.einsum("bngqk,bqngd->bknd", p, do_blk.astype(jnp.float32))
      return dk + jnp.einsum("bngqk,bqngd->bknd", ds, q_blk.astype(jnp.float32)), dv
    zero = jnp.zeros((k.shape[0], bk, *k.shape[2:]), jnp.float32)
    return jax.lax.fori_loop(_first_query_block(blocks, j, q_offset), blocks.nq, query_block,
                             (zero, zero))

  dq = jnp.moveaxis(jax.lax.map(dq_block, jnp.arange(blocks.nq)), 0, 1).reshape(q.shape)
  dk, dv = jax.lax.map(dkv_block, jnp.arange(blocks.nk))
  dk, dv = (jnp.moveaxis(x, 0, 1).reshape(k.shape) for x in (dk, dv))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
