"""MoE dispatch benchmark: each backend against a dense SwiGLU FFN doing the same active work.

For a realistic layer (tokens 8192, d 512, ffn 1408, top-k 2) and E in {2, 4, 8, 16}, prints the
time of every backend (forward, and forward+backward) and its ratio to a dense SwiGLU FFN over
tokens*k rows, all measured in this run. Usage:

    python bench/moe_dispatch.py [--backends dropless,capacity] [--experts 2,4,8,16] [--dtype bf16]

Besides the library's backends, ``tokamax`` times the ``ragged`` backend through
``tokamax.ragged_dot`` (its Triton / Mosaic GPU grouped matmul where a GPU runs it), when that
package is installed.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import json
import math
import platform
import sys
import time

import jax
import jax.numpy as jnp

from flexolmo_jax.model import dispatch as D
from flexolmo_jax.model.layers import swiglu
from flexolmo_jax.model.moe import route


def timeit(fn, *args, reps: int) -> float:
  """Best of ``reps`` runs after a compile/warm-up run (the least noisy figure on a shared host)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return min(times)


def make_inputs(t, d, f, e, dtype, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 5)
  x = jax.random.normal(ks[0], (t, d), dtype)
  ws = (jax.random.normal(ks[1], (e, d, f), dtype) / math.sqrt(d),
        jax.random.normal(ks[2], (e, d, f), dtype) / math.sqrt(d),
        jax.random.normal(ks[3], (e, f, d), dtype) / math.sqrt(f))
  router = jax.random.normal(ks[4], (e, d), jnp.float32) * 0.5
  return x, ws, router


# Packages with a ``jax.lax.ragged_dot``-compatible ``ragged_dot``, timed as the ``ragged``
# backend with their grouped matmul.
EXTERNAL = ("tokamax",)


def dispatcher(backend):
  """``dispatch(x, weights, experts, *ws, **kw)`` for a library backend or an EXTERNAL one;
  None when that one's package is not installed."""
  if backend not in EXTERNAL:
    return functools.partial(D.dispatch, backend)
  try:
    kernel = importlib.import_module(backend).ragged_dot
  except ImportError:
    return None
  # tokamax reads its settings as absl flags, parsing sys.argv (this script's flags) unless
  # they are parsed already: parse none.
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS([sys.argv[0]])
  return functools.partial(D.ragged_dispatch, ragged_dot=kernel)


def moe_fns(dispatch, k, capacity_factor, block_size=0):
  def fwd(x, ws, router):
    r = route(x, router, k)
    return dispatch(x, r.weights_tk, r.experts_tk, *ws,
                    capacity_factor=capacity_factor, block_size=block_size)[0]

  def loss(x, ws, router):
    return jnp.sum(fwd(x, ws, router).astype(jnp.float32) ** 2)

  return jax.jit(fwd), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def dense_fns():
  def fwd(x, wg, wu, wd):
    return swiglu(x, wg, wu, wd)

  def loss(x, wg, wu, wd):
    return jnp.sum(fwd(x, wg, wu, wd).astype(jnp.float32) ** 2)

  return jax.jit(fwd), jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--tokens", type=int, default=8192)
  p.add_argument("--d", type=int, default=512)
  p.add_argument("--ffn", type=int, default=1408)
  p.add_argument("--top-k", type=int, default=2)
  p.add_argument("--experts", default="2,4,8,16")
  p.add_argument("--backends", default="dropless,capacity,ragged,dense")
  p.add_argument("--capacity-factor", type=float, default=1.25)
  p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
  p.add_argument("--block-size", type=int, default=0, help="dropless rows per block (0: auto)")
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--no-backward", action="store_true")
  p.add_argument("--json", help="also write the results here")
  args = p.parse_args()
  dtype = jnp.float32 if args.dtype == "fp32" else jnp.bfloat16
  t, d, f, k = args.tokens, args.d, args.ffn, args.top_k
  dispatchers = {name: dispatcher(name) for name in args.backends.split(",")}
  for name in [n for n, fn in dispatchers.items() if fn is None]:
    print(f"# {name}: not installed here, skipped (bench/gpu.sh: wheels in .whl/)")
    del dispatchers[name]
  backends = list(dispatchers)
  print(f"# MoE dispatch: tokens={t} d={d} ffn={f} top_k={k} dtype={args.dtype} "
        f"device={jax.devices()[0].device_kind} ({jax.default_backend()}, "
        f"{len(jax.devices())} device(s)) host={platform.machine()} jax={jax.__version__}")

  # The reference: a dense SwiGLU over tokens*k rows (the same active FLOPs as top-k routing).
  xr, (wg, wu, wd), _ = make_inputs(t * k, d, f, 1, dtype)
  ref_f, ref_b = dense_fns()
  ref_fwd = timeit(ref_f, xr, wg[0], wu[0], wd[0], reps=args.reps)
  ref_bwd = None if args.no_backward else timeit(ref_b, xr, wg[0], wu[0], wd[0], reps=args.reps)
  flops = 2 * 3 * t * k * d * f
  print(f"reference dense FFN ({t * k} rows): fwd {ref_fwd * 1e3:.1f} ms "
        f"({flops / ref_fwd / 1e9:.1f} GFLOP/s)"
        + ("" if ref_bwd is None else f", fwd+bwd {ref_bwd * 1e3:.1f} ms"))
  print(f"{'backend':>9} {'E':>3} {'fwd ms':>9} {'fwd/ref':>8} {'f+b ms':>9} {'f+b/ref':>8} "
        f"{'dropped':>8}")
  rows = []
  for e in [int(s) for s in args.experts.split(",")]:
    x, ws, router = make_inputs(t, d, f, e, dtype, seed=e)
    for backend in backends:
      fwd, bwd = moe_fns(dispatchers[backend], k, args.capacity_factor, args.block_size)
      tf = timeit(fwd, x, ws, router, reps=args.reps)
      tb = None if args.no_backward else timeit(bwd, x, ws, router, reps=args.reps)
      r = route(x, router, k)
      dropped = float(dispatchers[backend](x, r.weights_tk, r.experts_tk, *ws,
                                           capacity_factor=args.capacity_factor)[1].dropped_fraction)
      row = dict(backend=backend, experts=e, fwd_ms=tf * 1e3, fwd_ratio=tf / ref_fwd,
                 fwdbwd_ms=None if tb is None else tb * 1e3,
                 fwdbwd_ratio=None if tb is None else tb / ref_bwd, dropped=dropped)
      rows.append(row)
      fb = "" if tb is None else f"{tb * 1e3:9.1f} {tb / ref_bwd:8.2f}"
      print(f"{backend:>9} {e:3d} {tf * 1e3:9.1f} {tf / ref_fwd:8.2f} {fb or ' ' * 18} "
            f"{dropped:8.3f}", flush=True)
  for backend in backends:
    fw = [r["fwd_ms"] for r in rows if r["backend"] == backend]
    if len(fw) > 1:
      print(f"{backend}: forward cost max/min over E = {max(fw) / min(fw):.2f}")
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(dict(ref_fwd_ms=ref_fwd * 1e3, ref_fwdbwd_ms=None if ref_bwd is None
                     else ref_bwd * 1e3, rows=rows), fh, indent=1)


if __name__ == "__main__":
  main()
