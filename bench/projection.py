"""A dense projection's forward and weight gradient: ``layers.project`` (one 2-D matrix product
over the tokens) against the 3-D einsum over ``[batch, length, d]`` it replaces.

XLA:CPU gives the einsum's weight gradient a layout with both operands transposed plus a copy;
the 2-D product keeps the plain ``x.T @ dy``. Shapes: the FFN's up-projection of the tiny model
and of ``small`` at the suite's and the benchmark's batches.

    python bench/projection.py [--reps 20]
"""
from __future__ import annotations

import argparse
import platform

import jax
import jax.numpy as jnp
from moe_dispatch import timeit

from flexolmo_jax.model.layers import project

# (batch, length, d_model, d_ff)
SHAPES = ((8, 128, 64, 128), (8, 128, 768, 3072), (4, 512, 768, 3072))


def gradient(product):
  """The weight gradient of a squared-output loss: one forward and one ``x.T @ dy``."""
  return jax.jit(jax.grad(lambda w, x: jnp.sum(jnp.square(product(x, w)))))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--reps", type=int, default=20)
  args = p.parse_args()
  einsum = gradient(lambda x, w: jnp.einsum("btd,df->btf", x, w))
  ours = gradient(project)
  print(f"# weight gradient of x [b, t, d] @ w [d, f], fp32, {jax.default_backend()} "
        f"({platform.machine()}), best of {args.reps}")
  print(f"{'b x t':>9} {'d':>5} {'f':>5} {'einsum ms':>10} {'project ms':>11} {'speed-up':>9}")
  for b, t, d, f in SHAPES:
    key_x, key_w = jax.random.split(jax.random.key(0))
    x = jax.random.normal(key_x, (b, t, d))
    w = jax.random.normal(key_w, (d, f))
    slow, fast = (1e3 * timeit(fn, w, x, reps=args.reps) for fn in (einsum, ours))
    print(f"{f'{b} x {t}':>9} {d:>5} {f:>5} {slow:>10.2f} {fast:>11.2f} {slow / fast:>8.2f}x")


if __name__ == "__main__":
  main()
