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
- ``merged``: the public model plus named experts (``checkpoint/merge.py``).
- ``btm``: an ensemble of dense models (``eval/baselines.py``); it references its members.

Every manifest lists the directory's files with their sizes and CRC-32s (``files``), so a truncated
or corrupted file is found, and named, without decoding anything (``verify_files``,
``copy_checked``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from flexolmo_jax import distributed, paths
from flexolmo_jax.config import ModelConfig

FORMAT = "flexolmo_jax/1"
MANIFEST = "manifest.json"
PARAMS = "params"
KINDS = ("public", "expert", "dense", "merged", "btm")
FILES = "files"
_CHUNK = 8 << 20
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


def params_dir(directory: str) -> str:
  """The absolute ``params/`` of a saved directory: Orbax reads nothing from a relative path
  (its metadata of a relative path has no tree)."""
  return os.path.join(paths.absolute(directory), PARAMS)


def fingerprint(params: Mapping[str, Any]) -> str:
  """sha256 over every leaf's path, dtype, shape and bytes (one leaf on the host at a time)."""
  digest = hashlib.sha256()
  for path, leaf in sorted(flatten(params).items()):
    value = host_value(leaf)
    digest.update(f"{path}|{value.dtype.str}|{value.shape}\n".encode())
    digest.update(np.ascontiguousarray(value).tobytes())
  return digest.hexdigest()


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
  return ModelConfig(**data)


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
                                     "crc32": _crc32(os.path.join(partial, rel))}
             for rel in _walk(partial)}
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


def _crc32(path: str) -> int:
  crc = 0
  with open(path, "rb") as fh:
    while chunk := fh.read(_CHUNK):
      crc = zlib.crc32(chunk, crc)
  return crc


def _walk(directory: str) -> list[str]:
  return sorted(os.path.relpath(os.path.join(root, f), directory)
                for root, _, files in os.walk(directory) for f in files
                if os.path.join(root, f) != os.path.join(directory, MANIFEST))


def recorded_files(directory: str, manifest: Mapping[str, Any]) -> dict[str, dict[str, int]]:
  """The manifest's file list, after checking that every file is there with its size."""
  files = manifest.get(FILES)
  if not isinstance(files, Mapping):
    raise ValueError(f"{os.path.join(directory, MANIFEST)} lists no files; it was written by an "
                     "older flexolmo_jax. Save it again (re-run the step that wrote it).")
  for rel, info in files.items():
    path = os.path.join(directory, rel)
    if not os.path.isfile(path):
      raise ValueError(f"{path} is missing: the checkpoint {directory} is incomplete.")
    if os.path.getsize(path) != info["bytes"]:
      raise ValueError(f"{path} has {os.path.getsize(path)} bytes, the manifest says "
                       f"{info['bytes']}: the file is truncated or was modified.")
  return dict(files)


def _check_crc(path: str, crc: int, info: Mapping[str, int]) -> None:
  if crc != info["crc32"]:
    raise ValueError(f"{path} is corrupted: its CRC-32 {crc:08x} differs from the manifest's "
                     f"{info['crc32']:08x}.")


def verify_files(directory: str, manifest: Mapping[str, Any]) -> None:
  """Every recorded file present, of its size and CRC-32 (raises naming the first bad file)."""
  for rel, info in recorded_files(directory, manifest).items():
    _check_crc(os.path.join(directory, rel), _crc32(os.path.join(directory, rel)), info)


def copy_checked(jobs: Iterable[tuple[str, str, Mapping[str, int]]], workers: int = 0) -> int:
  """Copies (source, destination, record) files, checking each CRC-32 on the way (one read, one
  write); files run in parallel threads (zlib and file I/O release the GIL). Returns bytes."""

  def one(job):
    source, dest, info = job
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    crc, buf = 0, bytearray(_CHUNK)
    view = memoryview(buf)
    with open(source, "rb") as src, open(dest, "wb") as dst:
      while n := src.readinto(buf):
        crc = zlib.crc32(view[:n], crc)
        dst.write(view[:n])
    _check_crc(source, crc, info)
    return info["bytes"]

  with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
    return sum(pool.map(one, list(jobs)))


def read_manifest(directory: str, kind: str | None = None) -> dict:
  """The manifest of a saved directory; clear errors for a missing, partial or wrong-kind one."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{directory}: no such checkpoint directory.")
  path = os.path.join(directory, MANIFEST)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path} is missing: {directory} is not a complete flexolmo_jax checkpoint (an "
        "interrupted save, or a run directory whose model is not finished yet).")
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
