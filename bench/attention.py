"""Attention implementations side by side: forward + backward time and compiled temporary memory.

For each length T it compiles ``grad(sum(attend(q, k, v)))`` for every implementation that runs
on this platform (the reference formula, blocked, and cuDNN on a GPU), with packed segments, and
prints the compiler's temporary bytes and the best-of-``--reps`` time, and the ratios against
the reference measured in the same run. Programs whose temporaries exceed ``--max-gib`` are
compiled (their memory is reported) but not run.

    python bench/attention.py [--lengths 512,1024,2048,4096,8192] [--batch 1] [--heads 12]
                              [--head-dim 64] [--dtype float32] [--reps 3]
"""
from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from flexolmo_jax.model import attention


def candidates() -> list[str]:
  names = ["reference", "blocked"]
  if jax.default_backend() == "gpu":
    names.append("cudnn")
  return names


def inputs(b, t, h, d, dtype):
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(b, t, h, d)), dtype) for _ in "qkv")
  seg = jnp.asarray(np.repeat(np.arange(4), -(-t // 4))[:t][None].repeat(b, 0), jnp.int32)
  return q, k, v, attention.Mask(seg, seg, jnp.int32(0))


def measure(name, q, k, v, mask, reps, max_bytes):
  loss = lambda q, k, v: jnp.sum(attention.attend(q, k, v, mask, name).astype(jnp.float32))
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  if temp > max_bytes:
    return temp, None
  jax.block_until_ready(compiled(q, k, v))
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(q, k, v))
    best = min(best, time.perf_counter() - t0)
  return temp, best


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--lengths", default="512,1024,2048,4096,8192")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--heads", type=int, default=12)
  p.add_argument("--head-dim", type=int, default=64)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--max-gib", type=float, default=6.0)
  args = p.parse_args()
  print(f"# {platform.node()} {jax.devices()[0].device_kind} x{jax.device_count()}, jax "
        f"{jax.__version__}, {args.dtype}, batch {args.batch}, {args.heads} heads x "
        f"{args.head_dim}, forward + backward")
  print(f"{'T':>6} {'implementation':>14} {'temp MiB':>10} {'ms':>9} {'x reference':>11}")
  for t in map(int, args.lengths.split(",")):
    q, k, v, mask = inputs(args.batch, t, args.heads, args.head_dim, jnp.dtype(args.dtype))
    base = None
    for name in candidates():
      temp, seconds = measure(name, q, k, v, mask, args.reps, args.max_gib * 2**30)
      if name == "reference":
        base = seconds
      ms = f"{seconds * 1e3:9.1f}" if seconds else "  not run"
      ratio = f"{base / seconds:11.2f}" if seconds and base else f"{'-':>11}"
      print(f"{t:>6} {name:>14} {temp / 2**20:10.1f} {ms} {ratio}", flush=True)


if __name__ == "__main__":
  main()
