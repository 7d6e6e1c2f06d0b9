"""Saved models and expert artifacts: Orbax parameters plus a JSON manifest, written atomically.

A saved directory holds ``params/`` (an Orbax PyTree of plain nested dicts of arrays) and
``manifest.json``. It is written under ``<dir>.partial-<pid>`` and renamed into place only after
both are complete, so an interrupted save never leaves a directory that looks complete; readers
refuse a directory without its manifest.

Manifest kinds:
- ``public``: the dense public model (anchor). Carries ``fingerprint``, the sha256 of its
  parameters, which every expert artifact records as ``anchor_fingerprint``.
- ``expert``: one data owner's expert (FFN per layer, router row per layer, negative bias).
- ``dense``: a dense model continued from the public one (a baseline; ``train-dense``, ``soup``).
- ``merged``: the public model plus named experts (``checkpoint/merged_model.py``).
- ``btm``: an ensemble of dense models (``baselines/btm.py``); it references its members.

Every manifest lists the directory's files with their sizes and SHA-256 hashes (``files``,
checked by ``integrity``). A
saved directory comes from elsewhere as often as not (an owner's expert, a released model), so its
manifest is untrusted input: the listed paths must stay inside the directory, and every read of a
saved model verifies each file's size and hash first (:func:`read_manifest`; once per directory
and process). ``FLEXOLMO_NO_VERIFY=1`` (the CLI's ``--no-verify``) skips the hashing for trusted
local use; sizes are still checked.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from typing import Any, Iterable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from flexolmo_jax import distributed, paths
from flexolmo_jax.checkpoint.integrity import (FILES, recorded_files, sha256,
                                               verification_enabled, verify_files, walk)
from flexolmo_jax.config import ModelConfig
from flexolmo_jax.model.dispatch import check_backend

FORMAT = "flexolmo_jax/2"
MANIFEST = "manifest.json"
PARAMS = "params"
KINDS = ("public", "expert", "dense", "merged", "btm")
MAX_MANIFEST_BYTES = 64 << 20
_verified: set[tuple[str, float]] = set()    # (directory, manifest mtime) verified in this process
# Where each command that trains or builds a model puts it inside its run directory:
# pretrain and train-dense ``model/``, tune-router ``merged/``, train-expert ``expert/``.
RUN_OUTPUTS = ("model", "merged", "expert")


def saved_dir(path: str) -> str:
  """The saved model at ``path``: ``path`` itself when it holds a manifest, else the model inside
  the run directory of the command that made it (:data:`RUN_OUTPUTS`); always absolute."""
  path = paths.absolute(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist.")
  if not os.path.exists(os.path.join(path, MANIFEST)):
    for nested in RUN_OUTPUTS:
      if os.path.exists(os.path.join(path, nested, MANIFEST)):
        return os.path.join(path, nested)
  return path


def refuse_to_replace(directory: str, steps: int) -> None:
  """A model a run has published is never replaced by a different one: experts and merged models
  name it by its fingerprint. Re-running the finished run as it was is fine (it resumes at its
  end); asking it for another number of steps is refused, naming the flag."""
  if not os.path.exists(os.path.join(directory, MANIFEST)):
    return
  manifest = read_manifest(directory, verify=False)
  done = manifest.get("data_card", {}).get("steps")
  if done is not None and done != steps:
    raise FileExistsError(
        f"{directory} is published (fingerprint {str(manifest.get('fingerprint'))[:16]}, "
        f"{done} steps) and may be the anchor of experts; --steps {steps} would replace it. "
        "Train into a new run directory (--out) instead.")


def params_dir(directory: str) -> str:
  """The absolute ``params/`` of a saved directory: Orbax reads nothing from a relative path
  (its metadata of a relative path has no tree)."""
  return os.path.join(paths.absolute(directory), PARAMS)


def _digest(leaves: Iterable[tuple[str, np.ndarray]]) -> str:
  """sha256 over (path, dtype, shape, bytes) of each leaf, in the order given."""
  digest = hashlib.sha256()
  for path, value in leaves:
    digest.update(f"{path}|{value.dtype.str}|{value.shape}\n".encode())
    digest.update(np.ascontiguousarray(value).tobytes())
  return digest.hexdigest()


def fingerprint(params: Mapping[str, Any]) -> str:
  """sha256 over every leaf's path, dtype, shape and bytes (one leaf on the host at a time)."""
  return _digest((path, host_value(leaf)) for path, leaf in sorted(flatten(params).items()))


def check_fingerprint(directory: str, manifest: Mapping[str, Any]) -> None:
  """Recomputes a public model's fingerprint from its saved parameters (restored one leaf at a
  time) and refuses a mismatch with the manifest's."""
  shapes = {"/".join(path): (path, shape) for path, shape in saved_shapes(directory).items()}
  recomputed = _digest((name, restore_leaves(directory, {path: shape})[path])
                       for name, (path, shape) in sorted(shapes.items()))
  if recomputed != manifest.get("fingerprint"):
    raise ValueError(f"{directory}: its parameters do not match the fingerprint its manifest "
                     "records (the checkpoint was modified, or its manifest was rewritten).")


def host_value(leaf) -> np.ndarray:
  """The whole of ``leaf`` as a numpy array on this host; a leaf sharded over several processes
  is gathered (a collective: every process must call this for the same leaves, in order)."""
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    if leaf.is_fully_replicated:
      return np.asarray(leaf.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
  return np.asarray(jax.device_get(leaf))


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
  if data.get("expert_rows"):
    raise ValueError(f"{where}: expert_rows={data['expert_rows']!r}; a saved model holds its "
                     "own experts only (padding is a layout chosen when it is loaded).")
  try:
    cfg = ModelConfig(**data)
    check_backend(cfg.dispatch)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{where}: {e}") from None
  return cfg


def save(directory: str, params: Mapping[str, Any], manifest: Mapping[str, Any], *,
         overwrite: bool = False, extra_files: Mapping[str, str] | None = None) -> str:
  """Writes params + manifest (+ extra files copied in) to ``directory`` atomically.

  With several processes every one calls it (Orbax writes each its own shards); process 0
  alone copies the extra files, writes the manifest and renames the directory into place."""
  directory, partial = begin(directory, overwrite)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(partial, PARAMS), params)
  checkpointer.wait_until_finished()
  distributed.sync(f"store.save {partial}")
  if distributed.is_leader():
    for name, source in (extra_files or {}).items():
      shutil.copyfile(source, os.path.join(partial, name))
  finish(partial, directory, manifest)
  return directory


def begin(directory: str, overwrite: bool) -> tuple[str, str]:
  """(absolute directory, empty ``<directory>.partial-<pid>`` to write into); with several
  processes, process 0's pid names the one directory they all write into."""
  directory = paths.absolute(directory)
  if os.path.exists(directory) and not overwrite:
    raise FileExistsError(f"{directory} already exists; choose another output or overwrite.")
  partial = f"{directory}.partial-{distributed.broadcast_from_leader(os.getpid())}"
  if distributed.is_leader():
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
  distributed.sync(f"store.begin {partial}")
  return directory, partial


def finish(partial: str, directory: str, manifest: Mapping[str, Any],
           known: Mapping[str, Mapping[str, int]] | None = None) -> None:
  """Records the files of ``partial`` in its manifest (``known`` records are trusted, the rest
  are read), writes the manifest last, and renames ``partial`` into place (process 0; the
  others wait until it is there)."""
  if manifest.get("kind") not in KINDS:
    raise ValueError(f"manifest kind {manifest.get('kind')!r} is not one of {KINDS}.")
  if distributed.is_leader():
    known = dict(known or {})
    files = {rel: known.get(rel) or {"bytes": os.path.getsize(os.path.join(partial, rel)),
                                     "sha256": sha256(os.path.join(partial, rel))}
             for rel in walk(partial)}
    record = {"format": FORMAT, **manifest, FILES: files}
    with open(os.path.join(partial, MANIFEST), "w") as fh:
      json.dump(record, fh, indent=2, sort_keys=True)
    publish(partial, directory)
  distributed.sync(f"store.finish {directory}")


def publish(partial: str, directory: str) -> None:
  """Renames a complete ``partial`` into place (replacing ``directory`` if it exists)."""
  if os.path.exists(directory):
    stale = f"{directory}.replaced-{os.getpid()}"
    os.rename(directory, stale)
    os.rename(partial, directory)
    shutil.rmtree(stale)
  else:
    os.rename(partial, directory)


def read_manifest(directory: str, kind: str | None = None, *, verify: bool | None = None) -> dict:
  """The manifest of a saved directory, checked as untrusted input, with every file it lists
  verified (size and SHA-256; ``verify=None`` follows ``FLEXOLMO_NO_VERIFY``, once per directory
  and process). Clear errors for a missing, partial, tampered or wrong-kind one."""
  directory = paths.absolute(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{directory}: no such checkpoint directory.")
  path = os.path.join(directory, MANIFEST)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path} is missing: {directory} is not a complete flexolmo_jax checkpoint (an "
        "interrupted save, or a run directory whose model is not finished yet).")
  if os.path.getsize(path) > MAX_MANIFEST_BYTES:
    raise ValueError(f"{path} has {os.path.getsize(path)} bytes; a manifest has at most "
                     f"{MAX_MANIFEST_BYTES}.")
  try:
    with open(path) as fh:
      manifest = json.load(fh)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not valid JSON ({e}).") from e
  if not isinstance(manifest, dict):
    raise ValueError(f"{path}: a manifest is a JSON object.")
  if manifest.get("format") != FORMAT:
    raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r} (a "
                     "checkpoint of another flexolmo_jax version: save it again).")
  if manifest.get("kind") not in KINDS:
    raise ValueError(f"{path}: kind {manifest.get('kind')!r} is not one of {KINDS}.")
  if kind is not None and manifest.get("kind") != kind:
    raise ValueError(
        f"{directory} holds a {manifest.get('kind')!r} checkpoint, but a {kind!r} one is needed.")
  verify = verification_enabled() if verify is None else verify
  key = (directory, os.path.getmtime(path))
  if verify and key not in _verified:
    verify_files(directory, manifest)
    _verified.add(key)
    # A checkpoint's sub-directories with manifests of their own (a merged model's public/ and
    # experts/) were verified with it.
    for rel in manifest[FILES]:
      if rel.endswith("/" + MANIFEST):
        sub = os.path.join(directory, os.path.dirname(rel))
        _verified.add((sub, os.path.getmtime(os.path.join(sub, MANIFEST))))
  else:
    recorded_files(directory, manifest)
  return manifest


def load_params(directory: str, target: Any = None) -> dict:
  """Restores ``params/``; with ``target`` (arrays or ShapeDtypeStructs, shardings honoured) the
  structure must match exactly: a missing or extra leaf is an error, never a partial restore."""
  path = params_dir(directory)
  checkpointer = ocp.StandardCheckpointer()
  try:
    if target is None:   # whatever topology saved it: every leaf on the first local device
      target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
                            dict(checkpointer.metadata(path).item_metadata))
    # A leaf without a sharding lands on the first local device, whatever topology saved it
    # (a model trained on many devices loads on one).
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                       sharding=getattr(x, "sharding", None) or local), target)
    return checkpointer.restore(path, abstract)
  except ValueError as e:
    raise ValueError(f"{path}: the saved parameters do not match the expected structure: {e}") from e


def saved_shapes(directory: str) -> dict[tuple[str, ...], tuple[int, ...]]:
  """{leaf path: shape} of ``params/`` from Orbax's metadata (nothing is read)."""
  tree = ocp.StandardCheckpointer().metadata(params_dir(directory)).item_metadata.tree
  return {tuple(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def restore_leaves(directory: str, shapes: Mapping[tuple[str, ...], tuple[int, ...]]
                   ) -> dict[tuple[str, ...], np.ndarray]:
  """Only the named leaves of ``params/`` (paths as key tuples), as host numpy arrays; the rest
  of the checkpoint is not read."""
  item: dict = {}
  for path, shape in shapes.items():
    node = item
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = np.zeros(shape, np.float32)      # a template: calloc'd, never touched
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  out = ocp.PyTreeCheckpointer().restore(
      params_dir(directory),
      args=ocp.args.PyTreeRestore(item=item, partial_restore=True, restore_args=restore_args))
  result = {}
  for path in shapes:
    node = out
    for key in path:
      node = node[key]
    result[path] = np.asarray(node)
  return result
