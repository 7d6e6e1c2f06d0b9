"""Training-step throughput against the Hugging Face PyTorch models, measured in the same run.

For each configuration it times one full optimizer step (forward, backward, AdamW, clipping) of
our jitted step and of transformers' model with ``torch.optim.AdamW`` on the same shapes, and
prints tokens/s, the ratio (target: ours >= 1.5x) and MFU against this machine's measured fp32
matmul peak. Then it compares an *expert-training* step (frozen anchor, trainable expert) with
*full* training of the same 2-expert model.

    python bench/train_step.py [--reps 3] [--only moe4] [--dtype bf16] [--batch 4 --seq 512]

On a GPU both sides run there (transformers' model on ``cuda``, each step synchronized);
``--dtype bf16`` computes in bfloat16 with float32 parameters on both sides (our
``ModelConfig.dtype``, torch's autocast). The expert-vs-full comparison needs the whole package
(seqio, TF); ``--skip-expert`` runs without it.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from flexolmo_jax import sharding
from flexolmo_jax.config import MeshConfig, ModelConfig, load_model_config
from flexolmo_jax.model.transformer import pure_model
from flexolmo_jax.train import loop, metrics

MOE4 = ModelConfig(vocab_size=50304, d_model=512, n_layers=8, n_heads=8, d_ff=1408,
                   experts=("public", "a", "b", "c"), top_k=2, max_seq_len=512)
CONFIGS = {"small": load_model_config("small"), "moe4": MOE4}
RULES = sharding.ShardingRules()


def model_config(name: str, seq_len: int, bf16: bool) -> ModelConfig:
  """One of CONFIGS, or any model gin file by name (``olmo2_1b``) or path, computing in bf16 or
  fp32 and long enough for ``seq_len``."""
  cfg = CONFIGS[name] if name in CONFIGS else load_model_config(name)
  return cfg.replace(max_seq_len=max(seq_len, cfg.max_seq_len),
                     dtype="bfloat16" if bf16 else "float32")


def batch_of(cfg, b, t, seed=0):
  rs = np.random.RandomState(seed)
  toks = rs.randint(0, cfg.vocab_size, (b, t + 1)).astype(np.int32)
  return {"decoder_input_tokens": toks[:, :-1], "decoder_target_tokens": toks[:, 1:],
          "decoder_segment_ids": np.ones((b, t), np.int32),
          "decoder_positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
          "decoder_loss_weights": np.ones((b, t), np.float32)}


def best_of(step, reps):
  step()   # compile / warm-up
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  return min(times)


def time_trainer(make_trainer, cfg, b, t, reps):
  with tempfile.TemporaryDirectory() as tmp:
    trainer = make_trainer(tmp)
    batch = trainer.train_batch(batch_of(cfg, b, t))

    def step():
      trainer.state, m = trainer._step_fn(trainer.state, trainer.frozen, batch)  # pylint: disable=protected-access
      jax.block_until_ready(m["loss"])
    return best_of(step, reps)


def train_cfg(b, t):
  return loop.TrainConfig(steps=100, batch_size=b, seq_len=t, warmup_steps=10,
                          mesh=MeshConfig(data=1), peak_tflops=1.0)


def full_trainer(cfg, b, t, params=None):
  model = pure_model(cfg)

  def make(tmp):
    mesh = sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1])
    return loop.Trainer(
        train_cfg(b, t), workdir=tmp, mesh=mesh, rules=RULES, params=params or model.init(0),
        frozen={}, param_shardings=model.shardings(mesh, RULES), frozen_shardings={},
        apply=lambda p, _, x: model(p, x["decoder_input_tokens"]), stream=None)
  return make


def expert_trainer(dense_cfg, b, t):
  from flexolmo_jax.train import expert   # data and privacy: not needed by the other timings

  dense = pure_model(dense_cfg)
  ecfg = expert.ExpertConfig()
  moe = pure_model(expert.expert_config(dense_cfg, "owner", ecfg))

  def make(tmp):
    mesh = sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1])
    anchor = dense.init(0)
    rows = jnp.zeros((dense_cfg.n_layers, dense_cfg.d_model))
    params = expert.initial_expert(anchor, rows, ecfg)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return loop.Trainer(
        train_cfg(b, t), workdir=tmp, mesh=mesh, rules=RULES, params=params,
        frozen={"anchor": anchor, "public_router": rows},
        param_shardings=expert.expert_shardings(params, mesh, RULES),
        frozen_shardings={"anchor": dense.shardings(mesh, RULES), "public_router": replicated},
        apply=lambda p, f, x: moe(expert.assemble(f["anchor"], f["public_router"], p),
                                  x["decoder_input_tokens"]), stream=None)
  return make, moe


def hf_step_time(cfg: ModelConfig, b, t, reps, bf16=False):
  import contextlib

  import torch
  from transformers import FlexOlmoConfig, FlexOlmoForCausalLM, Olmo2Config, Olmo2ForCausalLM

  torch.set_num_threads(os.cpu_count())
  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.manual_seed(0)
  common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
                num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=max(cfg.max_seq_len, t),
                pad_token_id=0, eos_token_id=1, rms_norm_eps=cfg.norm_eps,
                rope_parameters={"rope_theta": cfg.rope_theta, "rope_type": "default"})
  if cfg.is_moe:
    model = FlexOlmoForCausalLM(FlexOlmoConfig(num_experts=cfg.num_experts,
                                               num_experts_per_tok=cfg.top_k, **common))
  else:
    model = Olmo2ForCausalLM(Olmo2Config(**common))
  model.to(device).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
  data = batch_of(cfg, b, t)
  ids = torch.as_tensor(data["decoder_input_tokens"], dtype=torch.long, device=device)
  labels = torch.as_tensor(data["decoder_target_tokens"], dtype=torch.long, device=device)
  autocast = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if bf16 else (
      contextlib.nullcontext)

  def step():
    with autocast():
      logits = model(input_ids=ids).logits
      loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                               labels.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device == "cuda":
      torch.cuda.synchronize()
  return best_of(step, reps)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--only", default="", help="comma-separated configs: " + ",".join(CONFIGS) +
                 " or model gin names (olmo2_1b)")
  p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
  p.add_argument("--skip-expert", action="store_true")
  p.add_argument("--no-hf", action="store_true",
                 help="ours only: does the step fit, and at what MFU (no transformers run)")
  args = p.parse_args(argv)
  b, t = args.batch, args.seq
  bf16 = args.dtype == "bf16"
  peak = metrics.measure_matmul_peak("bfloat16" if bf16 else "float32")
  where = (jax.devices()[0].device_kind if jax.default_backend() != "cpu"
           else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
  print(f"# train step: batch {b} x {t}, {args.dtype}, {jax.default_backend()} ({where}); "
        f"measured {args.dtype} matmul peak {peak / 1e9:.1f} GFLOP/s")
  print(f"{'config':>7} {'params':>8} {'ours tok/s':>11} {'HF tok/s':>10} {'ratio':>6} {'MFU':>6}")
  for name in (args.only.split(",") if args.only else CONFIGS):
    cfg = model_config(name, t, bf16)
    ours = time_trainer(full_trainer(cfg, b, t), cfg, b, t, args.reps)
    ref = float("nan") if args.no_hf else hf_step_time(cfg, b, t, args.reps, bf16)
    mfu = b * t / ours * metrics.flops_per_token(cfg, t) / peak
    print(f"{name:>7} {cfg.num_params() / 1e6:7.1f}M {b * t / ours:11.0f} {b * t / ref:10.0f} "
          f"{ref / ours:6.2f} {mfu:6.1%}", flush=True)
  if args.skip_expert:
    return
  dense_cfg = MOE4.replace(experts=(), top_k=1)
  make_expert, moe_model = expert_trainer(dense_cfg, b, t)
  cfg2 = moe_model.cfg
  expert_s = time_trainer(make_expert, cfg2, b, t, args.reps)
  full_s = time_trainer(full_trainer(cfg2, b, t), cfg2, b, t, args.reps)
  print(f"# 2-expert model ({cfg2.num_params() / 1e6:.1f}M, top-2 of 2): expert-training step "
        f"{expert_s * 1e3:.0f} ms vs full training {full_s * 1e3:.0f} ms: "
        f"ratio {expert_s / full_s:.2f} (must be < 1)")


if __name__ == "__main__":
  main()
