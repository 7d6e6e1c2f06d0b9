"""Input pipeline throughput vs model consumption: packed batches/s from a seqio Task
over FlexMix-mini, against the jitted forward+backward step time of the model on the same batch
shape, both measured in this run. The ratio (pipeline rate / model rate) must stay well above 1 so
training is never input-bound. ``--vocabulary`` tokenizes with another vocabulary (a Hugging Face
tokenizer.json: ``python -m tests.bpe DIR --olmo2`` writes an OLMo-2-style one of 100k entries);
the model's embedding then grows to hold it.
Usage: python bench/input_pipeline.py [--configs tiny,small] [--vocabulary SPEC]
"""
from __future__ import annotations

import argparse
import itertools
import os
import platform
import tempfile
import time

import jax
import jax.numpy as jnp
from flax import nnx

from flexolmo_jax.config import load_model_config
from flexolmo_jax.data import flexmix_mini, tasks, vocabularies
from flexolmo_jax.model.transformer import Transformer

SHAPES = {"tiny": (8, 256), "small": (8, 1024)}   # (batch, sequence length) per config


def pipeline_rate(task, batch, seq, n):
  it = tasks.lm_batches(task, seq_len=seq, batch_size=batch, seed=0)
  next(it)                                             # start-up
  t0 = time.perf_counter()
  for _ in itertools.islice(it, n):
    pass
  return n / (time.perf_counter() - t0)


def model_rate(config, batch, seq, n, vocab_size):
  cfg = load_model_config(config, max_seq_len=seq, remat=True)  # as training runs these shapes
  if vocab_size > cfg.vocab_size:
    cfg = cfg.replace(vocab_size=-(-vocab_size // 128) * 128)
  model = Transformer(cfg, nnx.Rngs(0))
  graphdef, state = nnx.split(model, nnx.Param)

  @jax.jit
  def step(state, toks):
    def loss(s):
      logits, aux = nnx.merge(graphdef, s)(toks)
      return jnp.mean(jax.nn.logsumexp(logits, -1)) + aux.moe_loss
    return jax.grad(loss)(state)

  toks = jnp.zeros((batch, seq), jnp.int32)
  jax.block_until_ready(step(state, toks))
  t0 = time.perf_counter()
  for _ in range(n):
    jax.block_until_ready(step(state, toks))
  return n / (time.perf_counter() - t0)


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--configs", default="tiny,small")
  p.add_argument("--batches", type=int, default=200)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--vocabulary", default="byte")
  args = p.parse_args()
  out = tempfile.mkdtemp(prefix="flexmix_bench_")
  card = flexmix_mini.build(out, "quick", log=lambda _: None)
  vocab = vocabularies.load(args.vocabulary)
  tasks.register_domain_task("bench_code", card["domains"]["code"]["dataset_dir"], vocab)
  print(f"# input pipeline vs model: host={platform.machine()} cores={os.cpu_count()} "
        f"jax={jax.__version__} device={jax.devices()[0].device_kind} "
        f"vocabulary={args.vocabulary} ({vocab.vocab_size} ids)")
  print(f"{'config':>6} {'batch x seq':>12} {'pipeline b/s':>13} {'model steps/s':>14} "
        f"{'ratio':>7}")
  for config in args.configs.split(","):
    batch, seq = SHAPES[config]
    pr = pipeline_rate("bench_code", batch, seq, args.batches)
    mr = model_rate(config, batch, seq, args.steps, vocab.vocab_size)
    print(f"{config:>6} {batch:>5} x {seq:<5} {pr:13.1f} {mr:14.2f} {pr / mr:7.1f}", flush=True)


if __name__ == "__main__":
  main()
