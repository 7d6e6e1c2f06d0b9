"""DP-SGD expert step against the non-DP expert step, measured in the same run.

Both train the same 2-expert model (frozen public model + one trainable expert) on B sequences of
T tokens: the non-DP step on a packed batch [B, T]; the DP step on B documents of T tokens, each
document's gradient computed, clipped and summed (jax_privacy.clipped_grad), then noised. The DP
step is timed at several micro-batch sizes (per-document gradients held at once). Memory is XLA's
compiled temporary-buffer size of each step (``memory_analysis().temp_size_in_bytes``).

    python bench/dp_step.py [--model tiny|small] [--batch 16] [--seq 256] [--reps 3]
"""
from __future__ import annotations

import argparse
import platform
import tempfile

import jax
import numpy as np

from bench.train_step import RULES, batch_of, best_of, expert_trainer, train_cfg
from flexolmo_jax import sharding
from flexolmo_jax.config import MeshConfig, load_model_config
from flexolmo_jax.privacy import accounting, documents, dpsgd
from flexolmo_jax.train import loop


def dp_batch(cfg, b, t):
  rs = np.random.RandomState(0)
  rows = [list(rs.randint(3, cfg.vocab_size, size=t)) for _ in range(b)]
  tokens = np.asarray(rows, np.int32)
  docs = documents.Documents(tokens, np.full(b, t), 1, t, 0, 0)
  return documents.examples(docs, np.arange(b))


def temp_bytes(step_fn, *args) -> float:
  analysis = step_fn.lower(*args).compile().memory_analysis()
  return float(getattr(analysis, "temp_size_in_bytes", float("nan")))


def measure(trainer, batch, reps):
  def step():
    trainer.state, m = trainer._step_fn(trainer.state, trainer.frozen, batch)  # pylint: disable=protected-access
    jax.block_until_ready(m["loss"])
  memory = temp_bytes(trainer._step_fn, trainer.state, trainer.frozen, batch)  # pylint: disable=protected-access
  return best_of(step, reps), memory


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="tiny")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--microbatches", default="1,4,16")
  args = p.parse_args()
  cfg = load_model_config(args.model)
  b, t = args.batch, args.seq
  make, _ = expert_trainer(cfg, b, t)
  print(f"machine: {platform.machine()}, {jax.device_count()} {jax.default_backend()} device(s); "
        f"model {args.model}, {b} x {t} tokens per step")
  with tempfile.TemporaryDirectory() as tmp:
    plain = make(tmp)
    base_s, base_mem = measure(plain, plain.train_batch(batch_of(cfg, b, t)), args.reps)
  print(f"{'step':>22} {'ms':>9} {'/ non-DP':>9} {'temp MB':>9} {'/ non-DP':>9}")
  print(f"{'non-DP expert':>22} {base_s * 1e3:9.1f} {1.0:9.2f} {base_mem / 1e6:9.1f} {1.0:9.2f}")
  for micro in [int(m) for m in args.microbatches.split(",")]:
    dp = accounting.DPConfig(enabled=True, noise_multiplier=1.0, microbatch_size=micro)
    guarantee = accounting.plan(dp, b, 100 * b, 100)
    with tempfile.TemporaryDirectory() as tmp:
      ref = make(tmp)
      mesh = sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1])
      trainer = loop.Trainer(
          train_cfg(b, t), workdir=tmp, mesh=mesh, rules=RULES,
          apply=ref.apply, params=ref.state.params, frozen=ref.frozen,
          param_shardings=ref.state_shardings.params, frozen_shardings=ref.frozen_shardings,
          stream=None, gradient=dpsgd.dp_gradient(ref.apply, train_cfg(b, t), dp, guarantee))
      s, mem = measure(trainer, trainer.train_batch(dp_batch(cfg, b, t)), args.reps)
    print(f"{f'DP, micro-batch {micro}':>22} {s * 1e3:9.1f} {s / base_s:9.2f} {mem / 1e6:9.1f} "
          f"{mem / base_mem:9.2f}")


if __name__ == "__main__":
  main()
