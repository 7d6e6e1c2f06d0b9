"""``flexolmo import-hf``: a Hugging Face checkpoint as one of our models (docs/method.md §10).

- ``Olmo2ForCausalLM`` -> a ``public`` model (with its fingerprint), ready for ``train-expert``.
- ``FlexOlmoForCausalLM`` -> a merged checkpoint; expert 0 is the public model. The other experts
  are named by ``names`` (else by the ``flexolmo.json`` an export wrote, else ``expert_1..n``).
  With ``split`` the public model and one artifact per expert are also kept as their own
  directories (``OUT/public``, ``OUT/experts/<name>``, the merge in ``OUT/merged``), so a released
  FlexOlmo model can be extended: its public model carries the released public router row as its
  ``per_layer`` embedding, so ``train-expert --router-init per_layer`` trains a new expert against
  exactly that row, and ``merge --public OUT/merged --expert NEW`` adds it.

Per-expert (``mlp.experts.{e}.gate_proj.weight``) and fused (``mlp.experts.gate_up_proj``) layouts
are both read; a missing or unexpected tensor is an error listing the names, a wrong shape names
the tensor. The vocabulary comes from the tokenizer files (ByT5 -> ``byte``, ``tokenizer.model``
-> SentencePiece) or ``vocabulary``; one the embedding cannot represent is refused.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Sequence

import numpy as np

from flexolmo_jax import paths
from flexolmo_jax.checkpoint import store
from flexolmo_jax.config import ModelConfig
from flexolmo_jax.convert import hf
from flexolmo_jax.convert.safetensors_io import TensorReader
from flexolmo_jax.data import vocabularies
from flexolmo_jax.experts import PUBLIC
from flexolmo_jax.experts import validate as validate_expert_names
from flexolmo_jax.flexolmo import merge as merge_lib
from flexolmo_jax.flexolmo import router_init

def detect_vocabulary(hf_dir: str, given: str | None) -> str:
  """A vocabulary spec from ``given`` or the tokenizer files: ``byte`` for ByT5's (and the one
  export-hf writes for the byte vocabulary), else the ``tokenizer.json`` (what transformers'
  AutoTokenizer reads first), else a SentencePiece ``tokenizer.model``."""
  if given:
    return given
  config_path = os.path.join(hf_dir, "tokenizer_config.json")
  if os.path.exists(config_path):
    with open(config_path) as fh:
      if json.load(fh).get("tokenizer_class") == "ByT5Tokenizer":
        return "byte"
  tokenizer_path = os.path.join(hf_dir, "tokenizer.json")
  if os.path.exists(tokenizer_path):
    paths.check_size(tokenizer_path, vocabularies.MAX_TOKENIZER_BYTES)
    with open(tokenizer_path) as fh:
      if json.load(fh).get("model", {}).get("vocab") == hf.byte_tokenizer_files(0)[
          "tokenizer.json"]["model"]["vocab"]:
        return "byte"                      # the byte tokenizer export-hf writes
    return tokenizer_path
  if os.path.exists(os.path.join(hf_dir, "tokenizer.model")):
    return os.path.join(hf_dir, "tokenizer.model")
  raise ValueError(
      f"{hf_dir}: cannot tell the vocabulary (no tokenizer.json, no tokenizer.model, no ByT5 "
      "tokenizer_config.json). Pass --vocabulary byte, a SentencePiece .model or a "
      "tokenizer.json.")


def vocabulary_record(spec: str, cfg: ModelConfig) -> tuple[dict, dict[str, str]]:
  """(the manifest's vocabulary entry, files to copy into the public model)."""
  identity = vocabularies.identity(spec)
  if identity["size"] > cfg.vocab_size:
    raise ValueError(f"The vocabulary {spec} has {identity['size']} ids but the model's embedding "
                     f"has {cfg.vocab_size} rows: the model cannot represent it.")
  saved_spec, files = vocabularies.saved_files(spec)
  return {"spec": saved_spec, **identity}, files


def _names(hf_dir: str, config: dict, names: Sequence[str] | None) -> tuple[str, ...] | None:
  if config["model_type"] != "flex_olmo":
    if names:
      raise ValueError(f"{hf_dir} is a dense model; --names is for FlexOlmo experts.")
    return None
  n = config["num_experts"]
  if names:
    names = list(names)
    if len(names) != n - 1:
      raise ValueError(f"{hf_dir} has {n} experts: give {n - 1} names for experts 1..{n - 1} "
                       f"(expert 0 is 'public'), got {names}.")
    return (PUBLIC, *names)
  record = os.path.join(hf_dir, hf.NAMES_FILE)
  if os.path.exists(record):
    try:
      with open(record) as fh:
        saved = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"{record}: not valid JSON ({e}).") from e
    saved = saved.get("experts") if isinstance(saved, dict) else None
    if saved is not None:
      if not isinstance(saved, list):
        raise ValueError(f"{record}: 'experts' is a list of names.")
      try:
        validate_expert_names(saved)
      except ValueError as e:
        raise ValueError(f"{record}: {e}") from e
    if saved and len(saved) == n and saved[0] == PUBLIC:
      return tuple(saved)
  return None          # hf.config_from_hf's expert_1..n


def import_hf(hf_dir: str, out: str, *, names: Sequence[str] | None = None, split: bool = False,
              vocabulary: str | None = None, overwrite: bool = False, progress=print) -> str:
  """Writes the model of ``hf_dir``; returns the public or merged checkpoint's directory."""
  config = hf.read_hf_config(hf_dir)
  cfg = hf.config_from_hf(config, expert_names=_names(hf_dir, config, names),
                          negative_bias=False)
  if cfg.is_moe:
    # Names decide the order of a merged model: public first, then sorted.
    order = (PUBLIC, *sorted(cfg.experts[1:]))
    cfg = cfg.replace(top_k_policy="clamp")
  vocab, extra = vocabulary_record(detect_vocabulary(hf_dir, vocabulary), cfg)
  tensors = hf.HFTensors(TensorReader(hf_dir), cfg, where=hf_dir)
  progress(f"import-hf: {config['model_type']} from {hf_dir}"
           + (f", experts {list(cfg.experts)}" if cfg.is_moe else ""))
  params = hf.params_from_hf(tensors, cfg)
  card = {"imported_from": os.path.abspath(hf_dir), "model_type": config["model_type"]}
  if not cfg.is_moe:
    fingerprint = store.fingerprint(params)
    out = store.save(out, params, {"kind": "public", "config": store.config_to_json(cfg),
                                   "vocabulary": vocab, "fingerprint": fingerprint,
                                   "data_card": card}, extra_files=extra, overwrite=overwrite)
    progress(f"public model -> {out}")
    return out
  index = [cfg.experts.index(n) for n in order]
  params["blocks"]["ffn"] = {k: v[:, index] for k, v in params["blocks"]["ffn"].items()}
  cfg = cfg.replace(experts=order)
  public_row = params["blocks"]["ffn"]["router_embedding"][:, 0]
  with tempfile.TemporaryDirectory() as tmp:
    # The released public router row, as the per-layer "embedding" train-expert builds r_pub from.
    emb = os.path.join(tmp, router_init.EMBEDDING_FILE)
    np.savez(emb, per_layer=public_row, shared=public_row.mean(axis=0),
             documents=np.int64(0))
    return merge_lib.save_moe(
        os.path.join(out, "merged") if split else out, cfg, params, vocabulary=vocab,
        extra_files={**extra, router_init.EMBEDDING_FILE: emb}, public_card=card,
        expert_cards={n: {**card, "expert": n} for n in cfg.experts[1:]},
        router_record={"source": "import-hf", **card}, parts=out if split else None,
        overwrite=overwrite, progress=progress)
