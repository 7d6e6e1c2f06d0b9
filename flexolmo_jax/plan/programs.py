"""A task's real step function with abstract, sharded arguments: the programs ``Trainer`` runs
(train/programs.py) with the trainable/frozen split of each method step, built from shapes alone."""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from flexolmo_jax import sharding
from flexolmo_jax.config import ModelConfig
from flexolmo_jax.flexolmo import expert, router_tune
from flexolmo_jax.model import moe
from flexolmo_jax.model.transformer import KVCache, pure_model, run_on_batch
from flexolmo_jax.plan import TASKS
from flexolmo_jax.train import metrics, params as params_lib
from flexolmo_jax.train.objective import BATCH_KEYS
from flexolmo_jax.train.programs import TrainState, programs

INT_KEYS = ("decoder_input_tokens", "decoder_target_tokens", "decoder_segment_ids",
            "decoder_positions")


class Program(NamedTuple):
  task: str
  model: ModelConfig          # the model the step computes with
  fn: Callable                # jitted, with its in/out shardings
  args: tuple                 # abstract arguments: ShapeDtypeStructs carrying their shardings
  groups: dict[str, Any]      # "params", "optimizer", "frozen", "batch", "cache": abstract trees
  tokens: int                 # tokens one step processes
  reference_flops: float      # 6N + attention per token (a third of it without a backward pass)


def abstract(tree, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree,
                      shardings)


def dense_of(cfg: ModelConfig) -> ModelConfig:
  """The public model of a preset: a MoE preset without its experts."""
  return (cfg.replace(experts=(), expert_rows=0, top_k=1, negative_bias=False) if cfg.is_moe
          else cfg)


def batch(train, batch_sharding) -> dict:
  shape = (train.batch_size, train.seq_len)
  return {k: jax.ShapeDtypeStruct(shape, jnp.int32 if k in INT_KEYS else jnp.float32,
                                  sharding=batch_sharding) for k in BATCH_KEYS}


def build(task: str, cfg: ModelConfig, train, mesh, rules: sharding.ShardingRules,
          ecfg: expert.ExpertConfig | None = None) -> Program:
  """The step of ``task`` for the preset ``cfg`` with ``train``'s batch, length and mesh
  (``ecfg``: how expert training holds the public model)."""
  ecfg = ecfg or expert.ExpertConfig()
  if task not in TASKS:
    raise ValueError(f"--task {task!r}: choose from {', '.join(TASKS)}.")
  cfg = moe.rows_for_mesh(cfg, mesh, rules)     # zero experts pad E to the expert axis
  if task in ("prefill", "decode"):
    return _generation(task, cfg, train, mesh, rules)
  if task in ("pretrain", "train-dense"):
    model = dense_of(cfg)
    apply, params, param_sh, frozen, frozen_sh = _dense(model, mesh, rules)
  elif task == "train-expert":
    model = expert.expert_config(dense_of(cfg), "expert", ecfg)
    apply, params, param_sh, frozen, frozen_sh = _expert(dense_of(cfg), model, mesh, rules, ecfg)
  elif task == "tune-router":
    if not cfg.is_moe:
      raise ValueError(f"--task tune-router needs a model with experts; {cfg.num_params():,}-"
                       "parameter dense preset given (try flexolmo_7x7b, or --experts).")
    model = cfg.replace(top_k=cfg.num_experts)
    apply, params, param_sh, frozen, frozen_sh = _router(model, mesh, rules)
  else:
    model = cfg
    apply, params, param_sh, frozen, frozen_sh = _dense(cfg, mesh, rules)
  params = abstract(params, param_sh)
  progs = programs(train, apply, params, param_sh, frozen_sh, mesh, rules)
  frozen = abstract(frozen, frozen_sh)
  data = batch(train, progs.batch_sharding)
  tokens = train.batch_size * train.seq_len
  per_token = metrics.flops_per_token(model, train.seq_len)
  if task == "eval":
    return Program(task, model, progs.evaluate, (params, frozen, data),
                   {"params": params, "optimizer": {}, "frozen": frozen, "batch": data,
                    "cache": {}},
                   tokens, per_token / 3 * tokens)
  replicated = NamedSharding(mesh, PartitionSpec())
  optimizer = abstract(jax.eval_shape(progs.tx.init, params), progs.state_shardings.opt_state)
  state = TrainState(jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated), params, optimizer)
  return Program(task, model, progs.step, (state, frozen, data),
                 {"params": params, "optimizer": optimizer, "frozen": frozen, "batch": data,
                  "cache": {}},
                 tokens, per_token * tokens)


def _generation(task: str, cfg: ModelConfig, train, mesh, rules) -> Program:
  """A step of ``generate``: the prompt (``seq_len`` tokens) into an empty KV cache of
  ``seq_len``, or one token decoded at the cache's last position; returns the greedy next
  tokens and the cache (donated, so it is updated in place)."""
  model = pure_model(cfg)
  param_sh = model.shardings(mesh, rules)
  params = abstract(model.abstract.to_pure_dict(), param_sh)
  b, s = train.batch_size, train.seq_len
  t = s if task == "prefill" else 1
  token_sh = sharding.batch_sharding(mesh, rules, (b, t))
  cache_sh = NamedSharding(mesh, rules.spec(("layers", "batch", "length", "heads", "kv")))
  replicated = NamedSharding(mesh, PartitionSpec())
  shape = (cfg.n_layers, b, s, cfg.n_kv_heads, cfg.head_dim)
  kv = jax.ShapeDtypeStruct(shape, jnp.dtype(cfg.dtype), sharding=cache_sh)
  cache = KVCache(kv, kv, jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated))
  tokens = jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=token_sh)

  def step(params, tokens, cache):
    logits, _, cache = model(params, tokens, cache=cache)
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

  cache_out = KVCache(cache_sh, cache_sh, replicated)
  fn = sharding.jit_sharded(step, mesh, rules, in_shardings=(param_sh, token_sh, cache_out),
                            out_shardings=(NamedSharding(mesh, rules.spec(("batch",))),
                                           cache_out), donate_argnums=(2,))
  per_token = metrics.flops_per_token(cfg, s) / 3   # a forward pass over up to s keys
  return Program(task, cfg, fn, (params, tokens, cache),
                 {"params": params, "optimizer": {}, "frozen": {}, "batch": tokens,
                  "cache": cache}, b * t, per_token * b * t)


def _dense(cfg: ModelConfig, mesh, rules):
  model = pure_model(cfg)
  apply = lambda p, _, b: run_on_batch(model, p, b)
  return apply, model.abstract.to_pure_dict(), model.shardings(mesh, rules), {}, {}


def _expert(public_cfg: ModelConfig, cfg: ModelConfig, mesh, rules, ecfg):
  dense = pure_model(public_cfg)
  anchor_sh = dense.shardings(mesh, rules)
  stored = abstract(dense.abstract.to_pure_dict(), anchor_sh)
  row = jax.ShapeDtypeStruct((public_cfg.n_layers, public_cfg.d_model), jnp.float32)
  params = jax.eval_shape(lambda a, r: expert.initial_expert(a, r, ecfg), stored, row)
  anchor = abstract(jax.eval_shape(lambda a: expert.hold_anchor(a, ecfg), stored), anchor_sh)
  apply, param_sh, frozen_sh = expert.training_parts(pure_model(cfg), params, anchor_sh, mesh,
                                                     rules)
  return apply, params, param_sh, {"anchor": anchor, "public_router": row}, frozen_sh


def _router(cfg: ModelConfig, mesh, rules):
  moe = pure_model(cfg)
  trainable, frozen = params_lib.split(moe.abstract.to_pure_dict(), router_tune.is_router)
  apply, router_sh, frozen_sh = router_tune.training_parts(moe, mesh, rules)
  return apply, trainable, router_sh, frozen, frozen_sh

