"""Hugging Face <-> flexolmo_jax parameter mapping (docs/method.md §10).

This module holds the name/shape mapping between a ``FlexOlmoForCausalLM`` / ``Olmo2ForCausalLM``
state dict (torch ``Linear`` layout ``[out, in]``) and this project's stacked parameters. It reads
both on-disk per-expert keys (``mlp.experts.{e}.gate_proj.weight``) and the fused in-memory form of
transformers 5.x (``mlp.experts.gate_up_proj [E, 2I, H]``, gate first).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Mapping

import numpy as np
from flax import nnx

from flexolmo_jax.config import ModelConfig
from flexolmo_jax.data.byte_ids import BYTE_OFFSET
from flexolmo_jax.experts import PUBLIC

CONFIG = "config.json"
NAMES_FILE = "flexolmo.json"     # written beside an export: expert names and provenance


# Bounds on a config.json's sizes, checked before anything is built from them (a config from
# elsewhere asking for 1e9 layers must not make a billion tensor names): far above any released
# OLMo or FlexOlmo.
SIZE_LIMITS = {"vocab_size": 1 << 22, "hidden_size": 1 << 16, "num_hidden_layers": 1024,
               "num_attention_heads": 1024, "num_key_value_heads": 1024, "head_dim": 4096,
               "intermediate_size": 1 << 20, "max_position_embeddings": 1 << 22,
               "num_experts": 1024, "num_experts_per_tok": 1024}
REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "intermediate_size")


def check_sizes(c: Mapping[str, Any], where: str = CONFIG) -> None:
  """Every size of a transformers config an integer within :data:`SIZE_LIMITS`; the floats
  positive numbers. Errors name the file and key."""
  for key in REQUIRED + (("num_experts", "num_experts_per_tok")
                         if c.get("model_type") == "flex_olmo" else ()):
    if key not in c:
      raise ValueError(f"{where}: {key!r} is missing.")
  for key, limit in SIZE_LIMITS.items():
    value = c.get(key)
    if value is None:
      continue
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
      raise ValueError(f"{where}: {key} = {value!r}; expected an integer from 1 to {limit}.")
  for key in ("rope_theta", "rms_norm_eps"):
    value = c.get(key, (c.get("rope_parameters") or {}).get(key))
    if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                              or not 0 < value < float("inf")):
      raise ValueError(f"{where}: {key} = {value!r}; expected a positive number.")


def config_from_hf(hf_config: Mapping[str, Any], expert_names=None, **changes) -> ModelConfig:
  """A ModelConfig from a transformers config dict (``model_type`` olmo2 or flex_olmo)."""
  c = dict(hf_config)
  model_type = c.get("model_type")
  if model_type not in ("olmo2", "flex_olmo"):
    raise ValueError(f"Unsupported model_type {model_type!r}: expected 'olmo2' or 'flex_olmo'.")
  check_sizes(c)
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
      raise ValueError("norm_topk_prob=True is not FlexOlmo routing (docs/method.md §3).")
    n = c["num_experts"]
    width = len(str(n - 1))    # zero-padded when n > 10, so sorting the names keeps the order
    names = tuple(expert_names) if expert_names else (PUBLIC,) + tuple(
        f"expert_{i:0{width}d}" for i in range(1, n))
    if len(names) != n:
      raise ValueError(f"{len(names)} expert names given for {n} experts: {list(names)}.")
    kwargs.update(experts=names, top_k=c["num_experts_per_tok"])
  kwargs.update(changes)
  return ModelConfig(**kwargs)


def config_to_hf(cfg: ModelConfig, *, pad_id: int, eos_id: int, bos_id: int | None,
                 dtype: str) -> dict:
  """The transformers ``config.json`` of an ``Olmo2ForCausalLM`` or ``FlexOlmoForCausalLM``."""
  out = {
      "architectures": ["FlexOlmoForCausalLM" if cfg.is_moe else "Olmo2ForCausalLM"],
      "model_type": "flex_olmo" if cfg.is_moe else "olmo2",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
      "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
      "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
      "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
      "rope_theta": cfg.rope_theta, "hidden_act": "silu", "attention_bias": False,
      "attention_dropout": 0.0, "tie_word_embeddings": False, "initializer_range": 0.02,
      "pad_token_id": pad_id, "eos_token_id": eos_id, "bos_token_id": bos_id,
      "dtype": {"fp32": "float32", "bf16": "bfloat16"}[dtype], "use_cache": True,
  }
  if cfg.is_moe:
    out.update(num_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k, norm_topk_prob=False,
               output_router_logits=False, router_aux_loss_coef=0.01)
  if pad_id >= cfg.vocab_size or eos_id >= cfg.vocab_size:
    raise ValueError(f"pad id {pad_id} / eos id {eos_id} must be below vocab_size "
                     f"{cfg.vocab_size}.")
  return out


def read_hf_config(directory: str) -> dict:
  path = os.path.join(directory, CONFIG)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{directory} has no {CONFIG}: not a Hugging Face model directory.")
  if os.path.getsize(path) > 1 << 20:
    raise ValueError(f"{path}: {os.path.getsize(path)} bytes is not a model config.")
  try:
    with open(path) as fh:
      config = json.load(fh)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON (line {e.lineno}: {e.msg}).") from e
  if not isinstance(config, dict):
    raise ValueError(f"{path}: a config is a JSON object.")
  if config.get("model_type") not in ("olmo2", "flex_olmo"):
    raise ValueError(f"{path}: model_type {config.get('model_type')!r} is not supported; "
                     "export-hf/import-hf handle 'olmo2' (dense) and 'flex_olmo' (MoE).")
  check_sizes(config, path)
  return config


# -- The tensor name map ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Tensor:
  """One of our leaves and the Hugging Face tensors it becomes.

  ``ours`` is the leaf's path; per layer ``i`` (and expert ``e`` for per-expert leaves) its slice
  of shape ``slice_shape`` maps to the tensor ``hf.format(i=i, e=e)``. ``split`` is where the
  slice's axes divide into the torch ``Linear`` input and output: the HF tensor is
  ``slice.reshape(prod(shape[:split]), -1).T`` (``[out, in]``); without ``split`` it is the slice
  flattened to ``hf_shape``.
  """

  ours: tuple[str, ...]
  hf: str
  slice_shape: tuple[int, ...]
  hf_shape: tuple[int, ...]
  split: int | None = None
  layered: bool = True
  per_expert: bool = False

  def to_hf(self, a: np.ndarray) -> np.ndarray:
    if self.split is None:
      return a.reshape(self.hf_shape)
    return a.reshape(int(np.prod(self.slice_shape[:self.split])), -1).T

  def from_hf(self, t: np.ndarray, name: str | None = None) -> np.ndarray:
    if tuple(t.shape) != self.hf_shape:
      raise ValueError(f"tensor {name or self.hf}: shape {tuple(t.shape)}, expected "
                       f"{self.hf_shape} for this config.")
    return (t if self.split is None else t.T).reshape(self.slice_shape)

  def names(self, cfg: ModelConfig, expert: int | None = None) -> list[str]:
    layers = range(cfg.n_layers) if self.layered else [None]
    experts = [expert] if expert is not None else (range(cfg.num_experts) if self.per_expert
                                                   else [None])
    return [self.hf.format(i=i, e=e) for e in experts for i in layers]


def tensor_map(cfg: ModelConfig) -> list[Tensor]:
  """Every leaf of the model in export order (the order of the safetensors shards)."""
  d, h, kv, hd, f, v = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, \
      cfg.vocab_size
  at = "model.layers.{i}.self_attn"
  out = [Tensor(("embed",), "model.embed_tokens.weight", (v, d), (v, d), layered=False)]
  for name, heads in (("q_proj", h), ("k_proj", kv), ("v_proj", kv)):
    out.append(Tensor(("blocks", "attn", name), f"{at}.{name}.weight", (d, heads, hd),
                      (heads * hd, d), split=1))
  out.append(Tensor(("blocks", "attn", "o_proj"), f"{at}.o_proj.weight", (h, hd, d), (d, h * hd),
                    split=2))
  for name, heads in (("q_norm", h), ("k_norm", kv)):
    out.append(Tensor(("blocks", "attn", name, "weight"), f"{at}.{name}.weight", (heads, hd),
                      (heads * hd,)))
  for ours, theirs in (("post_attention_norm", "post_attention_layernorm"),
                       ("post_feedforward_norm", "post_feedforward_layernorm")):
    out.append(Tensor(("blocks", ours, "weight"), f"model.layers.{{i}}.{theirs}.weight", (d,),
                      (d,)))
  mlp = "model.layers.{i}.mlp"
  if cfg.is_moe:
    e = cfg.num_experts
    out.append(Tensor(("blocks", "ffn", "router_embedding"), f"{mlp}.gate.weight", (e, d), (e, d)))
    for ours, theirs, shape in (("w_gate", "gate_proj", (d, f)), ("w_up", "up_proj", (d, f)),
                                ("w_down", "down_proj", (f, d))):
      out.append(Tensor(("blocks", "ffn", ours), f"{mlp}.experts.{{e}}.{theirs}.weight", shape,
                        shape[::-1], split=1, per_expert=True))
  else:
    for name, shape in (("gate_proj", (d, f)), ("up_proj", (d, f)), ("down_proj", (f, d))):
      out.append(Tensor(("blocks", "ffn", name), f"{mlp}.{name}.weight", shape, shape[::-1],
                        split=1))
  out.append(Tensor(("final_norm", "weight"), "model.norm.weight", (d,), (d,), layered=False))
  out.append(Tensor(("lm_head",), "lm_head.weight", (d, v), (v, d), split=1, layered=False))
  return out


def _byte_chars() -> dict[int, str]:
  """The byte -> printable character table of byte-level BPE tokenizers (GPT-2's scheme)."""
  printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
  others = [b for b in range(256) if b not in printable]
  table = {b: chr(b) for b in printable}
  table.update({b: chr(256 + n) for n, b in enumerate(others)})
  return table


def byte_tokenizer_files(max_length: int) -> dict[str, dict]:
  """The byte vocabulary's tokenizer: seqio ByteVocabulary's ids (pad 0, eos 1, unk 2, byte b is
  b + 3), which are ByT5's without extra ids. ``tokenizer.json`` is a byte-level BPE with no
  merges, so AutoTokenizer (and vLLM) load it; ``ByT5Tokenizer`` reads the same directory.
  ``encode`` adds no special token (ByT5Tokenizer's own default appends ``</s>``)."""
  special = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
  added = [{"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True} for i, tok in enumerate(special.values())]
  vocab = {tok: i for i, tok in enumerate(special.values())}
  vocab.update({ch: b + BYTE_OFFSET for b, ch in _byte_chars().items()})
  byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                "use_regex": False}
  tokenizer = {
      "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
      "normalizer": None, "pre_tokenizer": byte_level, "post_processor": None,
      "decoder": byte_level,
      "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>",
                "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": False,
                "byte_fallback": False, "ignore_merges": False, "vocab": vocab, "merges": []}}
  return {"tokenizer.json": tokenizer,
          "tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast",
                                    "model_max_length": max_length, "extra_ids": 0, **special},
          "special_tokens_map.json": special}


_FUSED = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)"
                    r"\.weight$")


class HFTensors:
  """Hugging Face tensors by their per-expert names, from a state dict (numpy or torch values) or
  a :class:`~flexolmo_jax.convert.safetensors_io.TensorReader`. The fused expert layout of
  transformers 5.x (``experts.gate_up_proj [E, 2I, H]``, gate first; ``experts.down_proj
  [E, H, I]``) is read through the same names."""

  def __init__(self, source, cfg: ModelConfig, where: str = "the state dict"):
    self.cfg, self.where = cfg, where
    if hasattr(source, "get") and hasattr(source, "names") and callable(source.names):
      self._get, self.present = source.get, source.names()
    else:
      self._get, self.present = source.__getitem__, set(source.keys())

  def _raw(self, name: str) -> np.ndarray:
    v = self._get(name)
    if hasattr(v, "detach"):
      v = v.detach().float().cpu().numpy()
    return np.asarray(v, np.float32)        # bf16 / fp16 checkpoints are widened exactly

  def _fused_source(self, name: str) -> tuple[str, int, slice] | None:
    m = _FUSED.match(name)
    if not m:
      return None
    prefix, e, kind = m.group(1), int(m.group(2)), m.group(3)
    f = self.cfg.d_ff
    if kind == "down_proj":
      return f"{prefix}.down_proj", e, slice(None)
    return f"{prefix}.gate_up_proj", e, slice(0, f) if kind == "gate_proj" else slice(f, 2 * f)

  def get(self, name: str) -> np.ndarray:
    if name in self.present:
      return self._raw(name)
    fused = self._fused_source(name)
    if fused and fused[0] in self.present:
      key, e, rows = fused
      return self._raw(key)[e, rows]
    raise KeyError(f"Missing tensor {name!r} in {self.where}.")

  def check(self, expected: list[str]) -> None:
    """Every expected tensor present and nothing else (errors list the names)."""
    used = set()
    missing = []
    for name in expected:
      if name in self.present:
        used.add(name)
        continue
      fused = self._fused_source(name)
      if fused and fused[0] in self.present:
        used.add(fused[0])
      else:
        missing.append(name)
    extra = sorted(self.present - used)
    if missing or extra:
      show = lambda xs: ", ".join(xs[:12]) + (f" ... ({len(xs)} in all)" if len(xs) > 12 else "")
      raise ValueError(f"{self.where} does not match the config: "
                       + (f"missing tensors: {show(missing)}" if missing else "")
                       + ("; " if missing and extra else "")
                       + (f"unexpected tensors: {show(extra)}" if extra else ""))


def read_leaf(tensors: HFTensors, t: Tensor, expert: int | None = None) -> np.ndarray:
  """Our stacked leaf ``[L, (E,) ...]`` (or, with ``expert``, that expert's ``[L, ...]``)."""
  cfg = tensors.cfg

  def one(name):
    try:
      return t.from_hf(tensors.get(name), name)
    except ValueError as e:
      raise ValueError(f"{tensors.where}: {e}") from None

  if not t.layered:
    return one(t.hf)
  if t.per_expert and expert is None:
    return np.stack([np.stack([one(t.hf.format(i=i, e=e)) for e in range(cfg.num_experts)])
                     for i in range(cfg.n_layers)])
  return np.stack([one(t.hf.format(i=i, e=expert)) for i in range(cfg.n_layers)])


def params_from_hf(sd, cfg: ModelConfig) -> dict:
  """Nested dict of numpy arrays shaped like ``nnx.state(Transformer(cfg), nnx.Param)``."""
  tensors = sd if isinstance(sd, HFTensors) else HFTensors(sd, cfg)
  tmap = tensor_map(cfg)
  tensors.check([n for t in tmap for n in t.names(cfg)])
  params: dict = {}
  for t in tmap:
    node = params
    for key in t.ours[:-1]:
      node = node.setdefault(key, {})
    node[t.ours[-1]] = read_leaf(tensors, t)
  if cfg.is_moe and cfg.negative_bias:
    params["blocks"]["ffn"]["negative_bias"] = np.zeros((cfg.n_layers, cfg.num_experts),
                                                        np.float32)
  return params


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
