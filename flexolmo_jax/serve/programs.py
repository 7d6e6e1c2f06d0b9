"""The two compiled programs of serving: prefill (one request's prompt) and decode (a few tokens
for every slot of the batch), each over one row's share of the KV cache and mapped over the rows.

A row carries its own position in the cache, its experts (a bool mask over the model's experts,
applied to its router logits: model/moe.route), its sampling settings and its seed. Each program
also returns the row's router weight per expert at the position that produced its token: the
top-k softmax weights of every layer, summed over layers (the attribution the server reports).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from flexolmo_jax.config import ModelConfig
from flexolmo_jax.eval.generate import nucleus
from flexolmo_jax.model import moe
from flexolmo_jax.model.transformer import KVCache, pure_model


def choose(logits_sv, temperature_s, top_p_s, keys):
  """Each row's next token: arg-max at temperature 0, else a sample of ``softmax(logits / T)``
  cut to its top-p nucleus with its own key: for each row, ``generate.choose`` with that row's
  settings. A batch with no sampled row (or no nucleus) skips that work: it costs more than the
  tiny model's whole decode step."""
  greedy = jnp.argmax(logits_sv, axis=-1).astype(jnp.int32)

  def sample(_):
    scaled = logits_sv / jnp.where(temperature_s > 0, temperature_s, 1.0)[:, None]
    cut = jax.lax.cond(jnp.any(top_p_s < 1.0),
                       lambda x: jnp.where((top_p_s < 1.0)[:, None],
                                           nucleus(x, top_p_s[:, None]), x),
                       lambda x: x, scaled)
    sampled = jax.vmap(lambda key, row: jax.random.categorical(key, row[None], axis=-1)[0])(
        keys, cut)
    return jnp.where(temperature_s > 0, sampled.astype(jnp.int32), greedy)

  return jax.lax.cond(jnp.any(temperature_s > 0), sample, lambda _: greedy, None)


def router_weights(cfg: ModelConfig, params: dict, x_ld, keep_e):
  """``[E]``: each expert's top-k router weight at one position, summed over the layers
  (``x_ld``: each layer's router input there); 0 for an expert the row does not keep."""
  ffn = params["blocks"]["ffn"]
  mask = moe.bias_mask(cfg.experts)
  bias = ffn.get("negative_bias") if cfg.negative_bias else None

  def layer(x_d, router_ed, bias_e):
    r = moe.route(x_d[None], router_ed, cfg.top_k, bias_e, mask, keep_e[None])
    return jnp.zeros((cfg.num_experts,), jnp.float32).at[r.experts_tk[0]].add(r.weights_tk[0])

  if bias is None:
    return jax.vmap(lambda x, r: layer(x, r, None))(x_ld, ffn["router_embedding"]).sum(0)
  return jax.vmap(layer)(x_ld, ffn["router_embedding"], bias).sum(0)


def _run_row(cfg, params, tokens_t, k, v, index, keep_e, last):
  """Runs one row's ``tokens_t`` over its cache ``k, v`` ([L, C, kv_heads, head_dim]) from
  ``index``; returns (logits [V], k, v, router weights [E]) at position ``last``."""
  t = tokens_t.shape[0]
  cache = KVCache(k[:, None], v[:, None], index)
  keep = jnp.broadcast_to(keep_e, (1, t, keep_e.shape[0])) if cfg.is_moe else None
  logits, _, hidden, cache = pure_model(cfg)(params, tokens_t[None], cache=cache,
                                             expert_keep_bte=keep, return_hidden=True)
  x_ld = jax.lax.dynamic_index_in_dim(hidden.router_inputs[:, 0], last, axis=1, keepdims=False)
  weights = router_weights(cfg, params, x_ld, keep_e) if cfg.is_moe else jnp.zeros((0,))
  return (jax.lax.dynamic_index_in_dim(logits[0], last, keepdims=False), cache.k[:, 0],
          cache.v[:, 0], weights)


def step_key(seed, step):
  """The sampling key of a row's ``step``-th token (0 for the first): ``generate``'s keys."""
  return jax.random.fold_in(jax.random.key(seed), step)


@functools.partial(jax.jit, static_argnames=("cfg", "context"), donate_argnums=(2, 3))
def prefill(params, tokens_t, k_all, v_all, slot, length, keep_e, temperature, top_p, seed, *,
            cfg: ModelConfig, context: int):
  """Runs one prompt (``tokens_t``, its first ``length`` tokens real, the rest padding to a
  bucket) from an empty cache, writes its cache into row ``slot`` of ``k_all, v_all``
  ([L, S, C, ...]) and chooses its first token. Padding writes keys past ``length`` that no
  later query sees: decoding overwrites each position before its causal mask reaches it."""
  zeros = jnp.zeros((cfg.n_layers, context, cfg.n_kv_heads, cfg.head_dim), k_all.dtype)
  logits, k, v, weights = _run_row(cfg, params, tokens_t, zeros, zeros, jnp.int32(0), keep_e,
                                   length - 1)
  nxt = choose(logits[None], temperature[None], top_p[None], step_key(seed, 0)[None])[0]
  k_all = jax.lax.dynamic_update_index_in_dim(k_all, k, slot, axis=1)
  v_all = jax.lax.dynamic_update_index_in_dim(v_all, v, slot, axis=1)
  return nxt, k_all, v_all, weights


@functools.partial(jax.jit, static_argnames=("cfg", "steps"), donate_argnums=(2, 3))
def decode(params, tokens_s, k_all, v_all, index_s, keep_se, temperature_s, top_p_s, seed_s,
           step_s, *, cfg: ModelConfig, steps: int = 1):
  """``steps`` tokens for every row, one program: row s feeds ``tokens_s[s]`` at position
  ``index_s[s]`` of its cache with its own experts, settings and key, then each token it
  chooses. Returns (tokens [steps, S], k_all, v_all, router weights [steps, S, E])."""
  def row(tok, k, v, index, keep_e):
    return _run_row(cfg, params, tok[None], k, v, index, keep_e, 0)

  def one(carry, j):
    tokens, k_all, v_all = carry
    logits, k_all, v_all, weights = jax.vmap(row, in_axes=(0, 1, 1, 0, 0),
                                             out_axes=(0, 1, 1, 0))(
        tokens, k_all, v_all, index_s + j, keep_se)
    keys = jax.vmap(step_key)(seed_s, step_s + j)
    nxt = choose(logits, temperature_s, top_p_s, keys)
    return (nxt, k_all, v_all), (nxt, weights)

  (_, k_all, v_all), (tokens, weights) = jax.lax.scan(one, (tokens_s, k_all, v_all),
                                                      jnp.arange(steps, dtype=jnp.int32))
  return tokens, k_all, v_all, weights
