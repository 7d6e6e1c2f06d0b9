"""Expert parallelism with an explicit all-to-all: tokens travel to the devices that hold their
experts, run there, and come back.

Under an active mesh whose ``expert`` axis has ``ep > 1`` devices, the experts are split over that
axis (``E / ep`` per device) and every device runs, under ``shard_map``:

1. for each of its token-assignments, the destination ``expert // (E / ep)`` (E padded up to a
   multiple of ep with zero experts no token routes to) and a slot among the
   assignments going there; a send buffer ``[ep, A, d]`` (``A`` = its assignments, the most any
   destination can receive from it, so nothing is ever dropped);
2. ``all_to_all`` over the expert axis: device ``s`` receives block ``s`` of every device;
3. its local experts on the received rows (the dropless grouped matmul; empty slots go to a zero
   expert and weigh nothing);
4. ``all_to_all`` back, and each assignment's output read from its slot and combined with its
   routing weight.

No expert weight crosses the expert axis; tokens do. Without such a mesh it is the local dispatch.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from flexolmo_jax import sharding


def expert_axis():
  """(mesh, rules, the mesh axis the experts split over) or None when there is none (> 1)."""
  active = sharding.active()
  if active is None:
    return None
  mesh, rules = active
  axes = [a for a in rules.mesh_axes("expert") if mesh.shape[a] > 1]
  if len(axes) > 1:
    raise ValueError(f"alltoall dispatch: experts split over one mesh axis, not {axes}.")
  return (mesh, rules, axes[0]) if axes else None


def dispatch(x_td, weights_tk, experts_tk, w_gate, w_up, w_down, *, local: Callable):
  """(y [T, d], assignments per expert [E]); ``local(x, weights, experts, w_gate, w_up, w_down)``
  runs experts on one device and returns (y, stats)."""
  found = expert_axis()
  if found is None:
    y, stats = local(x_td, weights_tk, experts_tk, w_gate, w_up, w_down)
    return y, stats.tokens_per_expert
  mesh, rules, axis = found
  ep, e = mesh.shape[axis], w_gate.shape[0]
  # Experts that do not divide the axis (7 over 8) are padded with zero experts no token routes to.
  padded = -(-e // ep) * ep
  w_gate, w_up, w_down = (jnp.pad(w, ((0, padded - e), (0, 0), (0, 0)))
                          for w in (w_gate, w_up, w_down))
  rows = rules.spec(("batch", None))
  experts = PartitionSpec(axis, None, None)

  def per_device(x, w, ex, wg, wu, wd):
    y, counts = _exchange(x, w, ex, (wg, wu, wd), axis, ep, padded, local)
    return y, (counts if rows[0] is None else jax.lax.psum(counts, rows[0]))[:e]

  return jax.shard_map(per_device, mesh=mesh, in_specs=(rows, rows, rows) + (experts,) * 3,
                       out_specs=(rows, PartitionSpec()), check_vma=False)(
                           x_td, weights_tk, experts_tk, w_gate, w_up, w_down)


def _exchange(x_td, weights_tk, experts_tk, local_weights, axis, ep: int, e: int, local):
  t, k = experts_tk.shape
  a, d, per = t * k, x_td.shape[1], e // ep
  flat = experts_tk.reshape(-1).astype(jnp.int32)
  dest = flat // per
  order = jnp.argsort(dest, stable=True)
  counts = jnp.bincount(dest, length=ep)
  rank = jnp.arange(a) - (jnp.cumsum(counts) - counts)[dest[order]]
  slot = jnp.zeros((a,), jnp.int32).at[order].set(rank.astype(jnp.int32))
  send = jnp.zeros((ep, a, d), x_td.dtype).at[dest, slot].set(x_td[jnp.arange(a) // k])
  ids = jnp.full((ep, a), per, jnp.int32).at[dest, slot].set(flat % per)   # per: an empty slot

  swap = lambda v: jax.lax.all_to_all(v, axis, 0, 0, tiled=True)
  recv, recv_ids = swap(send.reshape(ep * a, d)), swap(ids.reshape(ep * a))
  with_empty = [jnp.concatenate([w, jnp.zeros_like(w[:1])]) for w in local_weights]
  real = (recv_ids < per).astype(weights_tk.dtype)[:, None]
  y_rows, _ = local(recv, real, recv_ids[:, None], *with_empty)
  back = swap(y_rows).reshape(ep, a, d)
  y_a = back[dest, slot].reshape(t, k, d)
  y = jnp.einsum("tkd,tk->td", y_a.astype(jnp.float32), weights_tk).astype(x_td.dtype)
  return y, jnp.bincount(flat, length=e).astype(jnp.int32)
