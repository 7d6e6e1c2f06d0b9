"""Pallas splash attention (TPU) behind :func:`flexolmo_jax.model.attention.attend`'s signature.

The kernel takes one sequence ``[heads, T, D]`` with segment ids and a static causal mask; it is
vmapped over the batch and, under an active mesh, run per device with ``shard_map`` (a Pallas
call cannot be partitioned by the compiler): batch and heads split as the sharding rules say,
the sequence whole. Off TPU the same kernel runs in Pallas interpret mode, which is how the tests
check it on CPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernels
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
from jax.sharding import PartitionSpec

from flexolmo_jax import sharding

BLOCK = 512


def _kernel(length: int, heads: int, interpret: bool):
  """Built on every trace: its block tables become constants of the program being traced."""
  block = min(BLOCK, length)
  sizes = kernels.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                             block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                             block_q_dq=block, block_kv_dq=block)
  causal = masks.MultiHeadMask([masks.CausalMask((length, length)) for _ in range(heads)])
  return kernels.make_splash_mha(causal, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                 interpret=interpret)


def _local(q, k, v, q_segments, kv_segments, interpret: bool):
  """One device's share: q [B, H, T, D] (scaled), k, v [B, KV, T, D]."""
  kernel = _kernel(q.shape[2], q.shape[1], interpret)
  segments = kernels.SegmentIds(q_segments, kv_segments)
  return jax.vmap(kernel)(q, k, v, segments)


def attend(q, k, v, mask):
  """Causal attention within segments; ``mask.q_offset`` must be 0 (no KV cache)."""
  t, s, d = q.shape[1], k.shape[1], q.shape[3]
  if t != s or t % 128:
    raise ValueError(f"splash attention needs equal query and key lengths that are multiples of "
                     f"128; got {t} and {s}. Use attention='blocked'.")
  interpret = sharding.platform() != "tpu"
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)
  args = (heads_first(q * jnp.asarray(d ** -0.5, q.dtype)), heads_first(k), heads_first(v),
          mask.q_segments.astype(jnp.int32), mask.kv_segments.astype(jnp.int32))
  run = functools.partial(_local, interpret=interpret)
  active = sharding.active()
  if active is not None:
    mesh, rules = active
    qkv = rules.spec(("batch", "heads", None, None))
    seg = PartitionSpec(qkv[0], None)
    run = jax.shard_map(run, mesh=mesh, in_specs=(qkv, qkv, qkv, seg, seg), out_specs=qkv,
                        check_vma=False)
  return heads_first(run(*args))

