"""Hugging Face <-> flexolmo_jax parameter mapping (FLEXOLMO_SPEC.md section 10).

This module holds the name/shape mapping between a ``FlexOlmoForCausalLM`` / ``Olmo2ForCausalLM``
state dict (torch ``Linear`` layout ``[out, in]``) and this project's stacked parameters. It reads
both on-disk per-expert keys (``mlp.experts.{e}.gate_proj.weight``) and the fused in-memory form of
transformers 5.x (``mlp.experts.gate_up_proj [E, 2I, H]``, gate first).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from flax import nnx

from flexolmo_jax.config import ModelConfig


def config_from_hf(hf_config: Mapping[str, Any], expert_names=None, **changes) -> ModelConfig:
  """A ModelConfig from a transformers config dict (``model_type`` olmo2 or flex_olmo)."""
  c = dict(hf_config)
  model_type = c.get("model_type")
  if model_type not in ("olmo2", "flex_olmo"):
    raise ValueError(f"Unsupported model_type {model_type!r}: expected 'olmo2' or 'flex_olmo'.")
  rope = c.get("rope_parameters") or {}
  theta = rope.get("rope_theta", c.get("rope_theta", 500_000.0))
  kwargs = dict(
      vocab_size=c["vocab_size"], d_model=c["hidden_size"], n_layers=c["num_hidden_layers"],
      n_heads=c["num_attention_heads"],
      n_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
      head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
      d_ff=c["intermediate_size"], max_seq_len=c.get("max_position_embeddings", 4096),
      rope_theta=float(theta), norm_eps=c.get("rms_norm_eps", 1e-6))
  if model_type == "flex_olmo":
    if c.get("norm_topk_prob"):
      raise ValueError("norm_topk_prob=True is not FlexOlmo routing (spec section 3).")
    n = c["num_experts"]
    names = tuple(expert_names) if expert_names else ("public",) + tuple(
        f"expert_{i}" for i in range(1, n))
    if len(names) != n:
      raise ValueError(f"{len(names)} expert names given for {n} experts: {list(names)}.")
    kwargs.update(experts=names, top_k=c["num_experts_per_tok"])
  kwargs.update(changes)
  return ModelConfig(**kwargs)


def _get(sd: Mapping[str, Any], key: str) -> np.ndarray:
  if key not in sd:
    raise KeyError(f"Missing tensor {key!r} in the Hugging Face state dict.")
  v = sd[key]
  if hasattr(v, "detach"):
    v = v.detach().float().cpu().numpy()
  return np.asarray(v)


def _expert_ffn(sd, prefix: str, cfg: ModelConfig):
  """[E, d, f], [E, d, f], [E, f, d] from per-expert or fused keys."""
  f = cfg.d_ff
  if f"{prefix}.experts.gate_up_proj" in sd:
    gate_up = _get(sd, f"{prefix}.experts.gate_up_proj")          # [E, 2I, H]
    down = _get(sd, f"{prefix}.experts.down_proj")                # [E, H, I]
    return (gate_up[:, :f].transpose(0, 2, 1), gate_up[:, f:].transpose(0, 2, 1),
            down.transpose(0, 2, 1))
  g, u, d = [], [], []
  for e in range(cfg.num_experts):
    p = f"{prefix}.experts.{e}"
    g.append(_get(sd, f"{p}.gate_proj.weight").T)
    u.append(_get(sd, f"{p}.up_proj.weight").T)
    d.append(_get(sd, f"{p}.down_proj.weight").T)
  return np.stack(g), np.stack(u), np.stack(d)


def params_from_hf(sd: Mapping[str, Any], cfg: ModelConfig) -> dict:
  """Nested dict of numpy arrays shaped like ``nnx.state(Transformer(cfg), nnx.Param)``."""
  h, kv, hd, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
  layers = []
  for i in range(cfg.n_layers):
    p = f"model.layers.{i}"
    attn = {
        "q_proj": _get(sd, f"{p}.self_attn.q_proj.weight").T.reshape(d, h, hd),
        "k_proj": _get(sd, f"{p}.self_attn.k_proj.weight").T.reshape(d, kv, hd),
        "v_proj": _get(sd, f"{p}.self_attn.v_proj.weight").T.reshape(d, kv, hd),
        "o_proj": _get(sd, f"{p}.self_attn.o_proj.weight").T.reshape(h, hd, d),
        "q_norm": {"weight": _get(sd, f"{p}.self_attn.q_norm.weight").reshape(h, hd)},
        "k_norm": {"weight": _get(sd, f"{p}.self_attn.k_norm.weight").reshape(kv, hd)},
    }
    if cfg.is_moe:
      w_gate, w_up, w_down = _expert_ffn(sd, f"{p}.mlp", cfg)
      ffn = {"router_embedding": _get(sd, f"{p}.mlp.gate.weight"),
             "w_gate": w_gate, "w_up": w_up, "w_down": w_down}
      if cfg.negative_bias:
        ffn["negative_bias"] = np.zeros((cfg.num_experts,), np.float32)
    else:
      ffn = {name: _get(sd, f"{p}.mlp.{name}.weight").T
             for name in ("gate_proj", "up_proj", "down_proj")}
    layers.append({
        "attn": attn, "ffn": ffn,
        "post_attention_norm": {"weight": _get(sd, f"{p}.post_attention_layernorm.weight")},
        "post_feedforward_norm": {"weight": _get(sd, f"{p}.post_feedforward_layernorm.weight")},
    })
  blocks = _stack_dicts(layers)
  return {"embed": _get(sd, "model.embed_tokens.weight"), "blocks": blocks,
          "final_norm": {"weight": _get(sd, "model.norm.weight")},
          "lm_head": _get(sd, "lm_head.weight").T}


def _stack_dicts(items):
  if isinstance(items[0], dict):
    return {k: _stack_dicts([it[k] for it in items]) for k in items[0]}
  return np.stack(items)


def load_into(model: nnx.Module, params: Mapping[str, Any]) -> None:
  """Copies a nested dict of arrays into the model's parameters, checking names and shapes."""
  state = nnx.state(model, nnx.Param)
  flat = dict(nnx.to_flat_state(state))
  given = dict(_flatten(params))
  missing = sorted(".".join(map(str, k)) for k in flat if k not in given)
  extra = sorted(".".join(map(str, k)) for k in given if k not in flat)
  if missing or extra:
    raise ValueError(f"Parameter names differ: missing {missing}, unexpected {extra}.")
  for path, var in flat.items():
    value = given[path]
    if tuple(value.shape) != tuple(var[...].shape):
      raise ValueError(f"Shape mismatch for {'.'.join(map(str, path))}: "
                       f"got {tuple(value.shape)}, expected {tuple(var[...].shape)}.")
    var[...] = np.asarray(value, dtype=var[...].dtype)
  nnx.update(model, state)


def _flatten(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, Mapping):
      yield from _flatten(v, prefix + (k,))
    else:
      yield prefix + (k,), v
