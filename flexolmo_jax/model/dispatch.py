"""Token -> expert dispatch backends behind one signature (docs/architecture.md).

Every backend computes, for tokens ``x [T, d]`` routed to ``experts [T, k]`` with combine weights
``weights [T, k]`` (docs/method.md §3: softmax probabilities, not renormalized)::

    y[t] = sum_j weights[t, j] * SwiGLU_{experts[t, j]}(x[t])

and returns ``(y [T, d], DispatchStats)``. Backends:

- ``dense``    every expert on every token, masked combine. The oracle for tests; E/k times the work.
- ``capacity`` GShard-style: each expert takes at most ``C = ceil(capacity_factor * T * k / E)``
               assignments (first choices before second choices, then token order); the rest drop.
- ``dropless`` sort assignments by expert into blocks of ``block_size`` rows, run a blocked grouped
               matmul over the used blocks only, unsort. No drops. The CPU default.
- ``ragged``   the same sort with ``jax.lax.ragged_dot`` (for GPU/TPU).
- ``megablox`` the same sort with the Pallas TPU grouped matmul (TPU only; interpret mode elsewhere).

The permutations use gather-only backward passes (``take_rows``): each gather knows its inverse.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from flexolmo_jax import sharding
from flexolmo_jax.model import expert_parallel


class DispatchStats(NamedTuple):
  dropped_fraction: jax.Array    # scalar f32: share of token-assignments that were not computed
  tokens_per_expert: jax.Array   # [E] int32: assignments routed to each expert (before drops)


# ----------------------------------------------------------------------------- gather helpers

@jax.custom_vjp
def take_rows(x_nd, index_m, inverse_nj):
  """out[m] = x[index[m]] (a zero row where index[m] == N).

  ``inverse[n, :]`` lists the output rows that read x row n (entries >= M mean none), which makes
  the backward pass a gather too instead of a scatter-add.
  """
  return jnp.take(x_nd, index_m, axis=0, mode="fill", fill_value=0)


def _take_rows_fwd(x_nd, index_m, inverse_nj):
  return take_rows(x_nd, index_m, inverse_nj), (index_m, inverse_nj)


def _take_rows_bwd(res, g_md):
  index_m, inverse_nj = res
  grad = jnp.take(g_md, inverse_nj, axis=0, mode="fill", fill_value=0).sum(axis=1)
  return grad.astype(g_md.dtype), None, None


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def _combine(y_tkd, weights_tk, dtype):
  """sum_j weights[t, j] * y[t, j, :], accumulated in fp32."""
  return jnp.einsum("tkd,tk->td", y_tkd.astype(jnp.float32), weights_tk).astype(dtype)


def _counts(experts_tk, num_experts):
  return jnp.bincount(experts_tk.reshape(-1), length=num_experts).astype(jnp.int32)


# ----------------------------------------------------------------------------- dense (oracle)

def dense_dispatch(x_td, weights_tk, experts_tk, w_gate, w_up, w_down, **_):
  num_experts = w_gate.shape[0]
  h = jax.nn.silu(jnp.einsum("td,edf->etf", x_td, w_gate)) * jnp.einsum("td,edf->etf", x_td, w_up)
  y_etd = jnp.einsum("etf,efd->etd", h, w_down)
  combine_te = jnp.einsum("tke,tk->te", jax.nn.one_hot(experts_tk, num_experts), weights_tk)
  y = jnp.einsum("te,etd->td", combine_te, y_etd.astype(jnp.float32)).astype(x_td.dtype)
  return y, DispatchStats(jnp.float32(0.0), _counts(experts_tk, num_experts))


# ----------------------------------------------------------------------------- capacity (GShard)

def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
  return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def capacity_dispatch(x_td, weights_tk, experts_tk, w_gate, w_up, w_down, *, capacity_factor,
                      **_):
  (t, d), k, e = x_td.shape, experts_tk.shape[1], w_gate.shape[0]
  c = expert_capacity(t, k, e, capacity_factor)
  # Priority: every token's first choice before any second choice, then token order (GShard).
  experts_a = experts_tk.T.reshape(-1)                                 # a = j * T + t
  one_hot = jax.nn.one_hot(experts_a, e, dtype=jnp.int32)
  slot_a = jnp.sum((jnp.cumsum(one_hot, axis=0) - 1) * one_hot, axis=1)
  keep_a = slot_a < c
  dest_a = jnp.where(keep_a, experts_a * c + slot_a, e * c)          # e * c: out of bounds, dropped
  x_a = jnp.tile(x_td, (k, 1))
  buf = jnp.zeros((e * c, d), x_td.dtype).at[dest_a].add(x_a, mode="drop")
  buf = buf.reshape(e, c, d)
  h = jax.nn.silu(jnp.einsum("ecd,edf->ecf", buf, w_gate)) * jnp.einsum("ecd,edf->ecf", buf, w_up)
  y_buf = jnp.einsum("ecf,efd->ecd", h, w_down).reshape(e * c, d)
  y_a = jnp.take(y_buf, dest_a, axis=0, mode="fill", fill_value=0)
  y_tkd = y_a.reshape(k, t, d).transpose(1, 0, 2)
  dropped = jnp.sum(~keep_a).astype(jnp.float32) / keep_a.size
  return _combine(y_tkd, weights_tk, x_td.dtype), DispatchStats(dropped, _counts(experts_tk, e))


# ----------------------------------------------------------------------------- sorted layouts

class SortedLayout(NamedTuple):
  """Assignments a = t * k + j sorted by expert, each expert's rows padded to whole blocks."""

  token_of_row: jax.Array        # [P] token feeding padded row p, T for a padding row
  row_of_assignment: jax.Array   # [T, k] padded row of each assignment
  assignment_of_row: jax.Array   # [P, 1] assignment at padded row p, A for a padding row
  block_expert: jax.Array        # [P / block] expert of each block
  num_used_blocks: jax.Array     # scalar int32: blocks that hold any assignment (a prefix)
  group_sizes: jax.Array         # [E] int32 assignments per expert


# The largest automatic block per platform (bench/RESULTS.md). 256 rows fill a CPU matmul (best
# of 128/256/512 for the CPU benchmark layer). On an H100 the block loop's per-block cost
# dominates small blocks: a 7B layer (16384 tokens, d 4096, FFN 11008, bf16, E=8) ran at 3.9x the
# dense active-size FFN with 256-row blocks, 2.0x with 1024 and 1.9x with 2048.
MAX_BLOCK = {"cpu": 256}
ACCELERATOR_MAX_BLOCK = 2048


def block_size_for(num_assignments: int, num_experts: int, requested: int = 0,
                   platform: str | None = None) -> int:
  """Rows per block: ``requested`` if set, else the power of two near A/(4E), at least 8 and at
  most the platform's ``MAX_BLOCK`` (default: the platform being traced for).

  Small blocks waste less padding (at most E * (block - 1) rows), large ones less loop overhead.
  """
  if requested:
    return requested
  largest = MAX_BLOCK.get(platform or sharding.platform(), ACCELERATOR_MAX_BLOCK)
  target = max(1, num_assignments // (4 * num_experts))
  return int(min(largest, max(8, 2 ** math.floor(math.log2(target)))))


def sorted_layout(experts_tk, num_experts: int, block: int) -> SortedLayout:
  t, k = experts_tk.shape
  a = t * k
  flat = experts_tk.reshape(-1).astype(jnp.int32)
  counts = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  padded = (counts + block - 1) // block * block
  padded_end = jnp.cumsum(padded)
  padded_start = padded_end - padded
  start = jnp.cumsum(counts) - counts
  order = jnp.argsort(flat, stable=True)
  expert_sorted = flat[order]
  row_sorted = padded_start[expert_sorted] + jnp.arange(a, dtype=jnp.int32) - start[expert_sorted]
  row_of_assignment = jnp.zeros((a,), jnp.int32).at[order].set(row_sorted, unique_indices=True)
  num_blocks = (a + num_experts * (block - 1)) // block   # static bound on sum(ceil(n_e / block))
  rows = num_blocks * block
  assignment_of_row = jnp.full((rows,), a, jnp.int32).at[row_of_assignment].set(
      jnp.arange(a, dtype=jnp.int32), unique_indices=True)
  token_of_row = jnp.where(assignment_of_row < a, assignment_of_row // k, t)
  block_start = jnp.arange(num_blocks, dtype=jnp.int32) * block
  block_expert = jnp.minimum(jnp.searchsorted(padded_end, block_start, side="right"),
                             num_experts - 1).astype(jnp.int32)
  num_used = (padded_end[-1] // block).astype(jnp.int32)
  return SortedLayout(token_of_row, row_of_assignment.reshape(t, k), assignment_of_row[:, None],
                      block_expert, num_used, counts)


def _gather_sorted(x_td, layout: SortedLayout):
  return take_rows(x_td, layout.token_of_row, layout.row_of_assignment)


def _scatter_back(y_pd, layout: SortedLayout, weights_tk, dtype):
  t, k = layout.row_of_assignment.shape
  y_a = take_rows(y_pd, layout.row_of_assignment.reshape(-1), layout.assignment_of_row)
  return _combine(y_a.reshape(t, k, -1), weights_tk, dtype)


# ----------------------------------------------------------------------------- dropless (blocked)

def _dot(a, b, contract):
  """dot_general over the given (lhs, rhs) contracting dims, accumulated in fp32."""
  return jax.lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32)


_ROWS = ((1,), (0,))     # a [m, k] @ b [k, n]
_ROWS_T = ((1,), (1,))   # a [m, n] @ b[k, n].T
_COLS = ((0,), (0,))     # a [m, k].T @ b [m, n]


def _swiglu_blocks(x_pd, w_gate, w_up, w_down, block_expert, num_used, block: int):
  """Per used block b with expert e: y_b = down_e(silu(x_b gate_e) * (x_b up_e)).

  One loop iteration runs the whole SwiGLU of a block, so its activations stay in cache.
  Returns y and the pre-activations (gate, up) that the backward pass reuses.
  """
  num_blocks, dt = block_expert.shape[0], x_pd.dtype
  x_b = x_pd.reshape(num_blocks, block, -1)

  def body(i, carry):
    y, gate, up = carry
    e = block_expert[i]
    g = _dot(x_b[i], w_gate[e], _ROWS).astype(dt)
    u = _dot(x_b[i], w_up[e], _ROWS).astype(dt)
    out = _dot(jax.nn.silu(g) * u, w_down[e], _ROWS).astype(dt)
    return y.at[i].set(out), gate.at[i].set(g), up.at[i].set(u)

  f, d = w_down.shape[1], w_down.shape[2]
  init = (jnp.zeros((num_blocks, block, d), dt), jnp.zeros((num_blocks, block, f), dt),
          jnp.zeros((num_blocks, block, f), dt))
  y, gate, up = jax.lax.fori_loop(0, num_used, body, init)
  return y.reshape(num_blocks * block, d), gate, up


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def grouped_swiglu(x_pd, w_gate, w_up, w_down, block_expert, num_used, block: int):
  """SwiGLU experts over a SortedLayout's blocks; only the used blocks are computed."""
  return _swiglu_blocks(x_pd, w_gate, w_up, w_down, block_expert, num_used, block)[0]


def _grouped_swiglu_fwd(x_pd, w_gate, w_up, w_down, block_expert, num_used, block):
  y, gate, up = _swiglu_blocks(x_pd, w_gate, w_up, w_down, block_expert, num_used, block)
  return y, (x_pd, w_gate, w_up, w_down, block_expert, num_used, gate, up)


def _grouped_swiglu_bwd(block, res, g_pd):
  x_pd, w_gate, w_up, w_down, block_expert, num_used, gate, up = res
  num_blocks, dt = block_expert.shape[0], x_pd.dtype
  x_b = x_pd.reshape(num_blocks, block, -1)
  g_b = g_pd.reshape(num_blocks, block, -1)

  def body(i, carry):  # blocks are sorted by expert; weight grads accumulate into the expert's slot
    dx, dw_gate, dw_up, dw_down = carry
    e = block_expert[i]
    g32, u32 = gate[i].astype(jnp.float32), up[i].astype(jnp.float32)
    sig = jax.nn.sigmoid(g32)
    silu = g32 * sig
    dw_down = dw_down.at[e].add(_dot((silu * u32).astype(dt), g_b[i], _COLS))
    dh = _dot(g_b[i], w_down[e], _ROWS_T)
    d_gate = (dh * u32 * sig * (1.0 + g32 * (1.0 - sig))).astype(dt)
    d_up = (dh * silu).astype(dt)
    dw_gate = dw_gate.at[e].add(_dot(x_b[i], d_gate, _COLS))
    dw_up = dw_up.at[e].add(_dot(x_b[i], d_up, _COLS))
    dx_i = _dot(d_gate, w_gate[e], _ROWS_T) + _dot(d_up, w_up[e], _ROWS_T)
    return dx.at[i].set(dx_i.astype(dt)), dw_gate, dw_up, dw_down

  zeros = lambda w: jnp.zeros(w.shape, jnp.float32)
  dx, dw_gate, dw_up, dw_down = jax.lax.fori_loop(
      0, num_used, body, (jnp.zeros_like(x_b), zeros(w_gate), zeros(w_up), zeros(w_down)))
  return (dx.reshape(x_pd.shape), dw_gate.astype(w_gate.dtype), dw_up.astype(w_up.dtype),
          dw_down.astype(w_down.dtype), None, None)


grouped_swiglu.defvjp(_grouped_swiglu_fwd, _grouped_swiglu_bwd)


def dropless_dispatch(x_td, weights_tk, experts_tk, w_gate, w_up, w_down, *, block_size=0, **_):
  e = w_gate.shape[0]
  block = block_size_for(experts_tk.size, e, block_size)
  layout = sorted_layout(experts_tk, e, block)
  x_pd = _gather_sorted(x_td, layout)
  y_pd = grouped_swiglu(x_pd, w_gate, w_up, w_down, layout.block_expert, layout.num_used_blocks,
                        block)
  y = _scatter_back(y_pd, layout, weights_tk, x_td.dtype)
  return y, DispatchStats(jnp.float32(0.0), layout.group_sizes)


# ----------------------------------------------------------------------------- ragged / megablox

def ragged_dispatch(x_td, weights_tk, experts_tk, w_gate, w_up, w_down, *,
                    ragged_dot=jax.lax.ragged_dot, **_):
  """The sorted tokens through a grouped matmul with ``jax.lax.ragged_dot``'s signature: XLA's
  by default; ``bench/moe_dispatch.py`` passes others (``tokamax.ragged_dot``'s GPU kernels)."""
  layout = sorted_layout(experts_tk, w_gate.shape[0], block=1)
  x_ad = _gather_sorted(x_td, layout)
  gs = layout.group_sizes
  h = jax.nn.silu(ragged_dot(x_ad, w_gate, gs)) * ragged_dot(x_ad, w_up, gs)
  y_ad = ragged_dot(h, w_down, gs)
  y = _scatter_back(y_ad, layout, weights_tk, x_td.dtype)
  return y, DispatchStats(jnp.float32(0.0), gs)


def megablox_dispatch(x_td, weights_tk, experts_tk, w_gate, w_up, w_down, *, interpret=None,
                      **_):
  """The Pallas TPU grouped matmul (interpret mode off TPU). A Pallas call cannot be partitioned
  by the compiler, so under an active mesh each device runs it on its own tokens (``shard_map``
  over the batch axes, expert weights whole there) and the group sizes are summed."""
  if interpret is None:
    interpret = sharding.platform() != "tpu"
  local = functools.partial(_megablox_local, interpret=interpret)
  active = sharding.active()
  if active is None:
    return local(x_td, weights_tk, experts_tk, w_gate, w_up, w_down)
  mesh, rules = active
  rows = rules.spec(("batch", None))
  axes = rows[0]

  def per_device(*args):
    y, stats = local(*args)
    counts = stats.tokens_per_expert if axes is None else jax.lax.psum(stats.tokens_per_expert,
                                                                        axes)
    return y, DispatchStats(stats.dropped_fraction, counts)

  whole = PartitionSpec()
  return jax.shard_map(per_device, mesh=mesh, in_specs=(rows, rows, rows, whole, whole, whole),
                       out_specs=(rows, DispatchStats(whole, whole)), check_vma=False)(
                           x_td, weights_tk, experts_tk, w_gate, w_up, w_down)


def _megablox_local(x_td, weights_tk, experts_tk, w_gate, w_up, w_down, *, interpret: bool):
  from jax.experimental.pallas.ops.tpu.megablox import ops as megablox  # TPU kernels

  layout = sorted_layout(experts_tk, w_gate.shape[0], block=1)
  a = experts_tk.size
  rows = -(-a // 128) * 128                       # the kernel's row tile must divide the rows
  x_ad = jnp.pad(_gather_sorted(x_td, layout), ((0, rows - a), (0, 0)))
  gs = layout.group_sizes

  def gmm(lhs, rhs):
    tiling = (128, min(128, lhs.shape[1]), min(128, rhs.shape[2]))
    return megablox.gmm(lhs, rhs, gs, lhs.dtype, tiling, None, None, False, interpret)

  h = jax.nn.silu(gmm(x_ad, w_gate)) * gmm(x_ad, w_up)
  y_ad = gmm(h, w_down)[:a]
  y = _scatter_back(y_ad, layout, weights_tk, x_td.dtype)
  return y, DispatchStats(jnp.float32(0.0), gs)


def alltoall_dispatch(x_td, weights_tk, experts_tk, w_gate, w_up, w_down, *, block_size=0, **_):
  """Expert parallelism over the mesh's expert axis with all_to_all (model/expert_parallel.py),
  the dropless grouped matmul on each device's own experts."""
  local = functools.partial(dropless_dispatch, block_size=block_size)
  y, counts = expert_parallel.dispatch(x_td, weights_tk, experts_tk, w_gate, w_up, w_down,
                                       local=local)
  return y, DispatchStats(jnp.float32(0.0), counts)


BACKENDS = {
    "dense": dense_dispatch,
    "capacity": capacity_dispatch,
    "dropless": dropless_dispatch,
    "ragged": ragged_dispatch,
    "megablox": megablox_dispatch,
    "alltoall": alltoall_dispatch,
}


def check_backend(name: str) -> str:
  """``name`` if it is a registered backend or ``auto``; otherwise a clear error listing them."""
  if name != "auto" and name not in BACKENDS:
    raise ValueError(f"unknown dispatch backend {name!r}; choose one of auto, "
                     f"{', '.join(BACKENDS)}.")
  return name


def resolve(name: str, d_model: int, d_ff: int, platform: str | None = None) -> str:
  """The backend ``name`` means on ``platform`` (default: the one being traced for): ``auto`` is
  megablox on TPU where its 128-wide tiles divide the model's widths, else dropless (the one
  sparse backend whose cost tracks the active work on CPU and GPU, bench/RESULTS.md)."""
  if check_backend(name) != "auto":
    return name
  if (platform or sharding.platform()) == "tpu" and d_model % 128 == 0 and d_ff % 128 == 0:
    return "megablox"
  return "dropless"


def dispatch(backend: str, x_td, weights_tk, experts_tk, w_gate_edf, w_up_edf, w_down_efd, *,
             capacity_factor: float = 1.25, block_size: int = 0):
  """Runs the routed SwiGLU experts with the named backend. Returns (y [T, d], DispatchStats)."""
  backend = resolve(backend, w_gate_edf.shape[1], w_gate_edf.shape[2])
  return BACKENDS[backend](
      x_td, weights_tk, experts_tk, w_gate_edf, w_up_edf, w_down_efd,
            capacity_factor=capacity_factor, block_size=block_size)
