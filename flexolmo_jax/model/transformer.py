"""The decoder: the dense public model or the FlexOlmo MoE over named experts (docs/method.md §2).

Post-norm blocks::

    h   = x + RMSNorm_attn(Attn(x))
    out = h + RMSNorm_ff(FFN_or_MoE(h))
    logits = lm_head(RMSNorm_final(h_L))

Layer parameters are stacked on a leading ``layers`` axis and the block body is scanned, so a
32-layer model compiles as fast as a 2-layer one.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from flexolmo_jax import experts as experts_lib
from flexolmo_jax import sharding
from flexolmo_jax.config import ModelConfig
from flexolmo_jax.model import attention
from flexolmo_jax.model.dispatch import check_backend
from flexolmo_jax.model.layers import (Attention, FeedForward, RMSNorm, dtype_of, make_param,
                                       project, rope_cos_sin)
from flexolmo_jax.model.moe import MoE, MoEStats


class ModelAux(NamedTuple):
  """Router losses and statistics pooled over layers (zeros for a dense model)."""

  moe_loss: jax.Array           # z_loss_weight * router_z_loss + lb_weight * load_balance_loss
  router_z_loss: jax.Array      # mean over layers of mean_t logsumexp(logits)^2
  load_balance_loss: jax.Array  # E * sum_e f_e P_e pooled over layers (the HF aux loss)
  expert_share: jax.Array       # [E] share of token-assignments per selected expert (sums to 1)
  dropped_fraction: jax.Array   # mean over layers


class Block(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, *, stack: int = 0):
    d = cfg.d_model
    self.attn = Attention(cfg, rngs, stack=stack)
    self.post_attention_norm = RMSNorm((d,), ("embed",), cfg, stack=stack)
    self.ffn = MoE(cfg, rngs, stack=stack) if cfg.is_moe else FeedForward(cfg, rngs, stack=stack)
    self.post_feedforward_norm = RMSNorm((d,), ("embed",), cfg, stack=stack)

  def __call__(self, x, cos, sin, mask, expert_index=None, top_k=None, kv=None, keep=None):
    a = self.attn(x, cos, sin, mask, kv)
    a, new_kv = a if kv is not None else (a, None)
    h = x + self.post_attention_norm(a)
    h = sharding.constrain(h, ("batch", "length", "embed"))
    if isinstance(self.ffn, MoE):
      f, stats = self.ffn(h, expert_index, top_k, keep)
    else:
      f, stats = self.ffn(h), None
    out = h + self.post_feedforward_norm(f)
    return sharding.constrain(out, ("batch", "length", "embed")), (stats, h, new_kv)


class KVCache(NamedTuple):
  """Keys and values of every layer for decoding: ``[L, B, S, kv_heads, head_dim]``, filled up to
  ``index`` (the next position to write)."""

  k: jax.Array
  v: jax.Array
  index: jax.Array

  @classmethod
  def empty(cls, cfg: ModelConfig, batch: int, length: int) -> "KVCache":
    shape = (cfg.n_layers, batch, length, cfg.n_kv_heads, cfg.head_dim)
    zeros = jnp.zeros(shape, dtype_of(cfg.dtype))
    return cls(zeros, zeros, jnp.int32(0))


class Transformer(nnx.Module):
  """OLMo-2 / FlexOlmo decoder. ``model(tokens, experts=("public", "code"))`` runs a subset."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    check_backend(cfg.dispatch)   # the dispatch registry is the one list of backends
    attention.check_implementation(cfg.attention)
    self.cfg = cfg
    pd, std = dtype_of(cfg.param_dtype), cfg.init_std
    self.embed = make_param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), std=std,
                            dtype=pd)
    self.blocks = Block(cfg, rngs, stack=cfg.n_layers)
    self.final_norm = RMSNorm((cfg.d_model,), ("embed",), cfg)
    self.lm_head = make_param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), std=std,
                              dtype=pd)

  def __call__(self, tokens_bt, *, positions_bt=None, segment_ids_bt=None,
               experts: Sequence[str] | None = None, return_hidden: bool = False,
               cache: KVCache | None = None, expert_keep_bte=None):
    """Returns (logits [B, T, V] in fp32, ModelAux), plus with ``return_hidden`` a Hidden.

    With ``cache`` the tokens continue the cached sequence at ``cache.index`` (one unpacked
    sequence per row) and the updated cache is returned last. ``expert_keep_bte`` (bool
    [B, T, E] over ``cfg.experts``) drops experts per token in every layer (see moe.route)."""
    cfg = self.cfg
    dt = dtype_of(cfg.dtype)
    expert_index, top_k = select_experts(cfg, experts)
    b, t = tokens_bt.shape
    if expert_keep_bte is not None and (not cfg.is_moe or expert_keep_bte.shape != (
        b, t, cfg.num_experts)):
      raise ValueError(f"expert_keep_bte has shape {expert_keep_bte.shape}; expected "
                       f"{(b, t, cfg.num_experts)} for experts {cfg.experts}.")
    positions_bt, mask = positions_and_mask(b, t, positions_bt, segment_ids_bt, cache)
    cos, sin = rope_cos_sin(positions_bt, cfg.head_dim, cfg.rope_theta)
    x = jnp.take(self.embed[...], tokens_bt, axis=0).astype(dt)
    x = sharding.constrain(x, ("batch", "length", "embed"))

    graphdef, layer_state = nnx.split(self.blocks)

    def layer(x, scanned):
      state, kv = scanned
      kv = None if kv is None else (*kv, cache.index)
      out, (stats, h, new_kv) = nnx.merge(graphdef, state)(x, cos, sin, mask, expert_index,
                                                           top_k, kv, expert_keep_bte)
      return out, (stats, h if return_hidden else None, new_kv)

    if cfg.remat != "none" and cache is None:
      layer = jax.checkpoint(layer, policy=remat_policy(cfg.remat))
    scanned = (layer_state, None if cache is None else (cache.k, cache.v))
    if cfg.scan_layers:
      x, (stats, router_inputs, new_kv) = jax.lax.scan(layer, x, scanned)
    else:
      per_layer = [None] * cfg.n_layers
      for i in range(cfg.n_layers):
        x, per_layer[i] = layer(x, jax.tree.map(lambda a, i=i: a[i], scanned))
      stats, router_inputs, new_kv = jax.tree.map(lambda *a: jnp.stack(a), *per_layer)

    h = self.final_norm(x)
    logits = project(h, self.lm_head[...].astype(dt), preferred_element_type=jnp.float32)
    logits = sharding.constrain(logits, ("batch", "length", "vocab"))
    out = (logits, pool_stats(cfg, stats))
    if return_hidden:
      out += (Hidden(router_inputs, h),)
    if cache is not None:
      out += (KVCache(new_kv[0], new_kv[1], cache.index + t),)
    return out


def remat_policy(name: str):
  """The ``jax.checkpoint`` policy of a ``ModelConfig.remat`` name (config.REMAT_POLICIES)."""
  policies = jax.checkpoint_policies
  if name == "offload":
    if sharding.platform() == "cpu":
      raise ValueError("remat='offload' moves saved activations to host memory, which a CPU "
                       "device does not have apart; use 'dots_no_batch' or 'full' on CPU.")
    return policies.offload_dot_with_no_batch_dims("device", "pinned_host")
  return {"full": policies.nothing_saveable, "dots": policies.dots_saveable,
          "dots_no_batch": policies.dots_with_no_batch_dims_saveable}[name]


class Hidden(NamedTuple):
  """Hidden states for domain embeddings (flexolmo/router_init.py)."""

  router_inputs: jax.Array   # [L, B, T, d] the residual each layer's router sees (h after attention)
  final: jax.Array           # [B, T, d] the final-normed state that feeds the lm_head


def positions_and_mask(b: int, t: int, positions_bt, segment_ids_bt, cache: KVCache | None):
  """(positions [B, T], attention.Mask): of the packed segments (one segment per row by
  default), or with a KV cache of the tokens continuing it at ``cache.index``."""
  if cache is not None:
    if positions_bt is not None or segment_ids_bt is not None:
      raise ValueError("With a KV cache, positions follow the cache index (no packing).")
    positions_bt = jnp.broadcast_to(cache.index + jnp.arange(t, dtype=jnp.int32), (b, t))
    one = jnp.ones((b, t), jnp.int32)
    return positions_bt, attention.Mask(one, jnp.ones((b, cache.k.shape[2]), jnp.int32),
                                        cache.index)
  if positions_bt is None:
    positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  if segment_ids_bt is None:
    segment_ids_bt = jnp.ones((b, t), jnp.int32)
  return positions_bt, attention.Mask(segment_ids_bt, segment_ids_bt, jnp.int32(0))


def select_experts(cfg: ModelConfig, experts: Sequence[str] | str | None):
  """Validates a selection by name; returns (static indices in model order or None, top_k)."""
  if experts is None:
    return None, (cfg.top_k if cfg.is_moe else None)
  if not cfg.is_moe:
    raise ValueError(f"experts={list(experts)} given, but this is a dense model (no experts).")
  if not experts_lib.parse(experts):
    raise ValueError("The expert selection is empty; select at least one expert.")
  kept = experts_lib.select(cfg.experts, experts)
  index = tuple(cfg.experts.index(name) for name in kept)
  return index, experts_lib.active(cfg.top_k, cfg.top_k_policy, kept)


def pool_stats(cfg: ModelConfig, stats: MoEStats | None) -> ModelAux:
  zero = jnp.float32(0.0)
  if stats is None:
    return ModelAux(zero, zero, zero, jnp.zeros((0,), jnp.float32), zero)
  z_loss = jnp.mean(stats.z_loss)
  share = jnp.mean(stats.assignment_share, axis=0)   # pooled over layers, as HF pools them
  prob = jnp.mean(stats.mean_prob, axis=0)
  lb_loss = share.shape[0] * jnp.sum(share * prob)
  moe_loss = cfg.router_z_loss_weight * z_loss + cfg.load_balance_loss_weight * lb_loss
  return ModelAux(moe_loss, z_loss, lb_loss, share / jnp.sum(share),
                  jnp.mean(stats.dropped_fraction))


class PureModel(NamedTuple):
  """The model as functions of plain nested dicts of arrays (what trainers and Orbax handle)."""

  cfg: ModelConfig
  graphdef: nnx.GraphDef
  abstract: nnx.State   # ShapeDtypeStructs carrying each parameter's logical ``axes``

  def init(self, seed: int = 0) -> dict:
    """Fresh parameters, drawn in one compiled program (run eagerly, every initializer's shape
    would compile a program of its own: 7 for the tiny model, 4.4 s of a 1-step run's start)."""
    return _initializer(self.cfg)(seed)

  def module(self, params: dict) -> Transformer:
    state = jax.tree.map(lambda x: x, self.abstract)   # a fresh State: never mutate the template
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(self.graphdef, state)

  def __call__(self, params: dict, tokens_bt, **kwargs):
    return self.module(params)(tokens_bt, **kwargs)

  def shardings(self, mesh, rules) -> dict:
    return sharding.param_shardings(self.abstract, mesh, rules).to_pure_dict()


@functools.lru_cache(maxsize=16)
def _initializer(cfg: ModelConfig):
  return jax.jit(lambda seed: nnx.split(Transformer(cfg, nnx.Rngs(jax.random.key(seed))),
                                        nnx.Param)[1].to_pure_dict())


def pure_model(cfg: ModelConfig) -> PureModel:
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))), nnx.Param)
  return PureModel(cfg, graphdef, abstract)


def run_on_batch(model, params, batch, **kwargs):
  """A PureModel on a packed batch: its tokens with their positions and segments."""
  return model(params, batch["decoder_input_tokens"], positions_bt=batch["decoder_positions"],
               segment_ids_bt=batch["decoder_segment_ids"], **kwargs)
