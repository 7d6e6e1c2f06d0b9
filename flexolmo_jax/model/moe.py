"""The FlexOlmo router and MoE layer (docs/method.md §3).

Router: one embedding row per expert, ``logits = x W_r^T`` in fp32, plus ``min(b_e, 0)`` for each
non-public expert when the negative bias is on (section 4); softmax over **all** experts, then
top-k on the probabilities, **no** renormalization. The experts are SwiGLU FFNs stacked as
``[E, ...]`` in the model's expert order; a forward pass may select a subset by index.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from flexolmo_jax import sharding
from flexolmo_jax.config import ModelConfig
from flexolmo_jax.experts import PUBLIC
from flexolmo_jax.model import dispatch as dispatch_lib
from flexolmo_jax.model.layers import dtype_of, make_param


class Routing(NamedTuple):
  weights_tk: jax.Array   # f32 softmax probabilities of the chosen experts (not renormalized)
  experts_tk: jax.Array   # int32 chosen expert indices, best first
  logits_te: jax.Array    # f32 router logits (negative bias included)
  probs_te: jax.Array     # f32 softmax over all experts


class MoEStats(NamedTuple):
  """Per-layer router statistics; the decoder pools them over layers."""

  z_loss: jax.Array             # mean_t logsumexp(logits)^2
  assignment_share: jax.Array   # [E] count of top-k assignments / tokens (sums to k)
  mean_prob: jax.Array          # [E] mean router probability
  dropped_fraction: jax.Array   # share of assignments the dispatch did not compute


def route(x_td, router_ed, top_k: int, negative_bias_e=None, bias_mask_e=None,
          keep_te=None) -> Routing:
  """``keep_te`` (bool, optional) drops expert e for token t: its logit becomes -inf, so the
  softmax is the one over the kept experts, exactly as if the dropped ones were opted out."""
  logits = jnp.einsum("td,ed->te", x_td.astype(jnp.float32), router_ed.astype(jnp.float32))
  if negative_bias_e is not None:
    bias = jnp.minimum(negative_bias_e.astype(jnp.float32), 0.0)
    logits = logits + jnp.where(jnp.asarray(bias_mask_e), bias, 0.0)
  if keep_te is not None:
    logits = jnp.where(keep_te, logits, -jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1)
  weights, experts = jax.lax.top_k(probs, top_k)
  return Routing(weights, experts.astype(jnp.int32), logits, probs)


def bias_mask(names) -> tuple[bool, ...]:
  """Which experts the negative bias applies to: every one but ``public``."""
  return tuple(name != PUBLIC for name in names)


def router_z_loss(logits_te):
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits_te, axis=-1)))


# The MoE's parameters with an expert dimension, and their rank without the layer stack.
EXPERT_STACKS = {"router_embedding": 2, "negative_bias": 1, "w_gate": 3, "w_up": 3, "w_down": 3}


def rows_for_mesh(cfg: ModelConfig, mesh, rules: sharding.ShardingRules) -> ModelConfig:
  """``cfg`` with its expert stacks padded to a multiple of the mesh axes the experts split
  over (7 experts over an expert axis of 8 get one zero expert)."""
  if not cfg.is_moe:
    return cfg
  parts = math.prod(mesh.shape[a] for a in rules.mesh_axes("expert"))
  rows = -(-cfg.num_experts // parts) * parts
  return cfg if rows == cfg.num_expert_rows else cfg.replace(expert_rows=rows)


def pad_rows(params: dict, rows: int) -> dict:
  """A model's parameters (a nested dict) with every MoE's expert stacks padded with zeros to
  ``rows`` experts; a dense model's are returned as they are."""
  if not isinstance(params, dict):
    return params
  if "router_embedding" not in params:
    return {k: pad_rows(v, rows) for k, v in params.items()}

  def pad(name, leaf):
    if name not in EXPERT_STACKS:
      return leaf
    axis = leaf.ndim - EXPERT_STACKS[name]
    if leaf.shape[axis] == rows:
      return leaf
    widths = [(0, 0)] * leaf.ndim
    widths[axis] = (0, rows - leaf.shape[axis])
    return jnp.pad(leaf, widths)
  return {k: pad(k, v) for k, v in params.items()}


def weight_axes(cfg: ModelConfig) -> tuple[tuple, tuple]:
  """Logical axes of the (gate and up, down) expert weights. Under the all-to-all dispatch an
  expert's weights stay whole within its expert shard (their ``embed`` dimension is not split
  over FSDP): tokens travel to the weights, which never move."""
  embed = None if cfg.dispatch == "alltoall" else "embed"
  return ("expert", embed, "mlp"), ("expert", "mlp", embed)


class MoE(nnx.Module):
  """Router plus ``E`` SwiGLU experts; ``experts`` names them in the model's order. The stacks
  have ``cfg.num_expert_rows`` rows: past the experts, zero experts no token routes to."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, *, stack: int = 0):
    e, d, f = cfg.num_expert_rows, cfg.d_model, cfg.d_ff
    pd, std = dtype_of(cfg.param_dtype), cfg.init_std
    in_axes, out_axes = weight_axes(cfg)
    self.cfg = cfg
    self.router_embedding = make_param(rngs, (e, d), ("expert", "embed"), std=std, dtype=pd,
                                       stack=stack)
    if cfg.negative_bias:
      self.negative_bias = nnx.Param(jnp.zeros((stack, e) if stack else (e,), jnp.float32),
                                     axes=("layers", "expert") if stack else ("expert",))
    self.w_gate = make_param(rngs, (e, d, f), in_axes, std=std, dtype=pd, stack=stack)
    self.w_up = make_param(rngs, (e, d, f), in_axes, std=std, dtype=pd, stack=stack)
    self.w_down = make_param(rngs, (e, f, d), out_axes, std=std, dtype=pd, stack=stack)

  def __call__(self, x_btd, expert_index: Sequence[int] | None = None, top_k: int | None = None,
               keep_bte=None):
    """Routes and runs the experts; ``expert_index`` (static) selects a subset in model order;
    ``keep_bte`` (traced bool over the model's experts) drops experts per token (router tuning's
    expert dropout)."""
    cfg = self.cfg
    dt = dtype_of(cfg.dtype)
    names = cfg.experts
    params = {"router": self.router_embedding[...], "w_gate": self.w_gate[...],
              "w_up": self.w_up[...], "w_down": self.w_down[...]}
    if cfg.negative_bias:
      params["bias"] = self.negative_bias[...]
    # Padding rows are never routed to: the router sees the experts alone.
    e = len(names)
    params["router"], bias = params["router"][:e], params.get("bias")
    if bias is not None:
      params["bias"] = bias[:e]
    if expert_index is not None and tuple(expert_index) != tuple(range(len(names))):
      # Gathers the kept experts' weights on every call: right for trying an opt-out at
      # inference; a permanent opt-out writes a smaller model instead (merge --exclude).
      index = jnp.asarray(expert_index, jnp.int32)
      params = {k: jnp.take(v, index, axis=0) for k, v in params.items()}
      names = tuple(names[i] for i in expert_index)
      keep_bte = None if keep_bte is None else jnp.take(keep_bte, index, axis=-1)
    k = cfg.top_k if top_k is None else top_k
    b, t, d = x_btd.shape
    x_td = x_btd.reshape(b * t, d)
    keep_te = None if keep_bte is None else keep_bte.reshape(b * t, len(names))
    routing = route(x_td, params["router"], k, params.get("bias"), bias_mask(names), keep_te)
    y_td, dstats = dispatch_lib.dispatch(
        cfg.dispatch, x_td.astype(dt), routing.weights_tk, routing.experts_tk,
        params["w_gate"].astype(dt), params["w_up"].astype(dt), params["w_down"].astype(dt),
        capacity_factor=cfg.capacity_factor, block_size=cfg.dispatch_block_size)
    stats = MoEStats(
        z_loss=router_z_loss(routing.logits_te),
        assignment_share=dstats.tokens_per_expert[:len(names)].astype(jnp.float32) / (b * t),
        mean_prob=jnp.mean(routing.probs_te, axis=0),
        dropped_fraction=dstats.dropped_fraction)
    y = sharding.constrain(y_td.reshape(b, t, d), ("batch", "length", "embed"))
    return y, stats
