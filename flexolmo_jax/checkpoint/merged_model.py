"""A merged checkpoint on disk, and opening it over any selection of its experts.

A merged checkpoint stores one subtree per name; nothing is stacked on disk::

    <dir>/manifest.json     kind "merged": the MoE config (experts in the model's order), the
                            vocabulary, the anchor fingerprint, each expert's data card
    <dir>/public/           the public model exactly as ``pretrain`` wrote it
    <dir>/experts/<name>/   each expert artifact exactly as ``train-expert`` wrote it
    <dir>/router.npz        the live router: ``<name>/router`` [L, d] for every expert (``public``
                            included) and ``<name>/negative_bias`` [L]; ``tune-router`` rewrites it

Opening (:func:`load_merged`) stacks the chosen names into the ``[L, E, ...]`` arrays the model
computes with; opting experts out here builds exactly the model a merge without them writes
(docs/method.md §6). Writing one is the method's merge step (flexolmo/merge.py).
"""
from __future__ import annotations

import os
from typing import Sequence

import jax
import numpy as np

from flexolmo_jax import experts as experts_lib
from flexolmo_jax.checkpoint import store
from flexolmo_jax.config import ModelConfig
from flexolmo_jax.experts import PUBLIC
from flexolmo_jax.model.transformer import pure_model

KIND = "merged"
PUBLIC_DIR = "public"
EXPERTS_DIR = "experts"
ROUTER_FILE = "router.npz"
FFN_KEYS = ("w_gate", "w_up", "w_down")
DENSE_FFN = dict(zip(FFN_KEYS, ("gate_proj", "up_proj", "down_proj")))   # expert leaf -> dense


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  L, d, f = cfg.n_layers, cfg.d_model, cfg.d_ff
  return {"w_gate": (L, d, f), "w_up": (L, d, f), "w_down": (L, f, d), "router": (L, d),
          "negative_bias": (L,)}


def restore_small(path: str, keys: Sequence[str], cfg: ModelConfig) -> dict[str, np.ndarray]:
  """Only the named (small) leaves of an artifact, as host numpy arrays."""
  shapes = expected_shapes(cfg)
  got = store.restore_leaves(path, {(k,): shapes[k] for k in keys})
  return {k: got[(k,)] for k in keys}


def read_router(path: str) -> dict[str, np.ndarray]:
  with np.load(os.path.join(path, ROUTER_FILE)) as f:
    return {k: np.asarray(v) for k, v in f.items()}


def open_merged(path: str, experts=None, exclude=None) -> tuple[str, dict, ModelConfig]:
  """(directory, manifest, config over the selected experts) of a merged checkpoint (its files
  verified by :func:`store.read_manifest`)."""
  path = store.saved_dir(path)
  manifest = store.read_manifest(path, KIND)
  cfg = store.config_from_json(manifest["config"], os.path.join(path, store.MANIFEST))
  return path, manifest, cfg.with_experts(experts_lib.select(cfg.experts, experts, exclude))


def load_merged(path: str, experts=None, exclude=None, *, dtype: str | None = None
                ) -> tuple[ModelConfig, dict]:
  """(config, parameters) of the model over the selected names, stacked ``[L, E, ...]``.

  Opting out here builds exactly the model a merge without those experts writes. ``top_k``
  follows the config's ``top_k_policy`` when fewer experts remain (clamp, or an error).
  """
  path, _, cfg = open_merged(path, experts, exclude)
  names = cfg.experts
  if dtype:
    cfg = cfg.replace(dtype=dtype)
  dense_cfg = cfg.replace(experts=(), top_k=1, negative_bias=False)
  dense = store.load_params(os.path.join(path, PUBLIC_DIR),
                            pure_model(dense_cfg).abstract.to_pure_dict())
  rows = read_router(path)
  ffn = {PUBLIC: {key: dense["blocks"]["ffn"][DENSE_FFN[key]] for key in FFN_KEYS}}
  shapes = expected_shapes(cfg)
  for name in names[1:] if names[0] == PUBLIC else names:
    ffn[name] = restore_small(os.path.join(path, EXPERTS_DIR, name), FFN_KEYS, cfg)
  stack = lambda xs: np.stack([np.asarray(x) for x in xs], axis=1)
  moe = {key: stack([ffn[n][key] for n in names]) for key in FFN_KEYS}
  moe["router_embedding"] = stack([rows[f"{n}/router"] for n in names])
  if cfg.negative_bias:
    zero = np.zeros(shapes["negative_bias"], np.float32)
    moe["negative_bias"] = stack([rows.get(f"{n}/negative_bias", zero) for n in names])
  params = {**dense, "blocks": {**dense["blocks"], "ffn": moe}}
  return cfg, jax.tree.map(np.asarray, params)
