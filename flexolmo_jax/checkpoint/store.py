"""Saved models and expert artifacts: Orbax parameters plus a JSON manifest, written atomically.

A saved directory holds ``params/`` (an Orbax PyTree of plain nested dicts of arrays) and
``manifest.json``. It is written under ``<dir>.partial-<pid>`` and renamed into place only after
both are complete, so an interrupted save never leaves a directory that looks complete; readers
refuse a directory without its manifest.

Manifest kinds:
- ``public``: the dense public model (anchor). Carries ``fingerprint``, the sha256 of its
  parameters, which every expert artifact records as ``anchor_fingerprint``.
- ``expert``: one data owner's expert (FFN per layer, router row per layer, negative bias).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from flexolmo_jax.config import ModelConfig

FORMAT = "flexolmo_jax/1"
MANIFEST = "manifest.json"
PARAMS = "params"
KINDS = ("public", "expert")


def fingerprint(params: Mapping[str, Any]) -> str:
  """sha256 over every leaf's path, dtype, shape and bytes (one leaf on the host at a time)."""
  digest = hashlib.sha256()
  for path, leaf in sorted(flatten(params).items()):
    value = np.asarray(jax.device_get(leaf))
    digest.update(f"{path}|{value.dtype.str}|{value.shape}\n".encode())
    digest.update(np.ascontiguousarray(value).tobytes())
  return digest.hexdigest()


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Nested dicts -> {"a/b/c": leaf}."""
  out = {}
  for key, value in tree.items():
    path = f"{prefix}/{key}" if prefix else str(key)
    if isinstance(value, Mapping):
      out.update(flatten(value, path))
    else:
      out[path] = value
  return out


def num_params(tree: Mapping[str, Any]) -> int:
  return sum(int(np.prod(np.shape(v))) for v in flatten(tree).values())


def config_to_json(cfg: ModelConfig) -> dict:
  return dataclasses.asdict(cfg)


def config_from_json(data: Mapping[str, Any], where: str) -> ModelConfig:
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(data) - known)
  if unknown:
    raise ValueError(f"{where}: unknown model config keys {unknown}.")
  return ModelConfig(**data)


def save(directory: str, params: Mapping[str, Any], manifest: Mapping[str, Any], *,
         overwrite: bool = False, extra_files: Mapping[str, str] | None = None) -> str:
  """Writes params + manifest (+ extra files copied in) to ``directory`` atomically."""
  directory = os.path.abspath(directory)
  if manifest.get("kind") not in KINDS:
    raise ValueError(f"manifest kind {manifest.get('kind')!r} is not one of {KINDS}.")
  if os.path.exists(directory) and not overwrite:
    raise FileExistsError(f"{directory} already exists; choose another output or overwrite.")
  partial = f"{directory}.partial-{os.getpid()}"
  shutil.rmtree(partial, ignore_errors=True)
  os.makedirs(partial)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(partial, PARAMS), params)
  checkpointer.wait_until_finished()
  for name, source in (extra_files or {}).items():
    shutil.copyfile(source, os.path.join(partial, name))
  record = {"format": FORMAT, **manifest}
  with open(os.path.join(partial, MANIFEST), "w") as fh:
    json.dump(record, fh, indent=2, sort_keys=True)
  if os.path.exists(directory):
    stale = f"{directory}.replaced-{os.getpid()}"
    os.rename(directory, stale)
    os.rename(partial, directory)
    shutil.rmtree(stale)
  else:
    os.rename(partial, directory)
  return directory


def read_manifest(directory: str, kind: str | None = None) -> dict:
  """The manifest of a saved directory; clear errors for a missing, partial or wrong-kind one."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{directory}: no such checkpoint directory.")
  path = os.path.join(directory, MANIFEST)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path} is missing: {directory} is not a complete flexolmo_jax checkpoint (an "
        "interrupted save, or a training-run directory: pass its model/ sub-directory).")
  try:
    with open(path) as fh:
      manifest = json.load(fh)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e}).") from e
  if manifest.get("format") != FORMAT:
    raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}.")
  if kind is not None and manifest.get("kind") != kind:
    raise ValueError(
        f"{directory} holds a {manifest.get('kind')!r} checkpoint, but a {kind!r} one is needed.")
  return manifest


def load_params(directory: str, target: Any = None) -> dict:
  """Restores ``params/``; with ``target`` (arrays or ShapeDtypeStructs, shardings honoured) the
  structure must match exactly: a missing or extra leaf is an error, never a partial restore."""
  path = os.path.join(os.path.abspath(directory), PARAMS)
  checkpointer = ocp.StandardCheckpointer()
  try:
    if target is None:
      return checkpointer.restore(path)
    abstract = jax.tree.map(
        lambda x: x if isinstance(x, jax.ShapeDtypeStruct)
        else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), target)
    return checkpointer.restore(path, abstract)
  except ValueError as e:
    raise ValueError(f"{path}: the saved parameters do not match the expected structure: {e}") from e
