"""The files of a saved directory, checked as untrusted input: every manifest lists each file
with its size and SHA-256; paths must stay inside the directory, and files are plain files (no
links) of the recorded size and hash. Copies are checked byte for byte on the way."""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Mapping

from flexolmo_jax import console, paths

MANIFEST = "manifest.json"
FILES = "files"
MAX_FILES = 100_000        # entries of a manifest's file list
NO_VERIFY_ENV = console.NO_VERIFY_ENV
_CHUNK = 8 << 20


def sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as fh:
    while chunk := fh.read(_CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


def walk(directory: str) -> list[str]:
  return sorted(os.path.relpath(os.path.join(root, f), directory)
                for root, _, files in os.walk(directory) for f in files
                if os.path.join(root, f) != os.path.join(directory, MANIFEST))


def _check_record(manifest_path: str, rel: Any, info: Any) -> None:
  """One entry of a manifest's file list, as untrusted input: a plain relative path inside the
  directory, a byte count and a SHA-256."""
  where = f"{manifest_path}: files[{rel!r}]"
  if (not isinstance(rel, str) or not rel or os.path.isabs(rel) or "\\" in rel or "\0" in rel
      or any(part in ("", ".", "..") for part in rel.split("/")) or rel == MANIFEST):
    raise ValueError(f"{where}: not a plain relative path inside the checkpoint.")
  if (not isinstance(info, Mapping) or not isinstance(info.get("bytes"), int)
      or isinstance(info.get("bytes"), bool) or info["bytes"] < 0
      or not isinstance(info.get("sha256"), str) or len(info["sha256"]) != 64
      or any(c not in "0123456789abcdef" for c in info["sha256"])):
    raise ValueError(f"{where}: needs a byte count and a SHA-256 (64 hex digits), got {info!r}.")


def recorded_files(directory: str, manifest: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
  """The manifest's file list, checked as untrusted input, after checking that every file is
  there (a regular file inside ``directory``, not a link) with its size."""
  where = os.path.join(directory, MANIFEST)
  files = manifest.get(FILES)
  if not isinstance(files, Mapping):
    raise ValueError(f"{where} lists no files; it was written by an older flexolmo_jax. Save it "
                     "again (re-run the step that wrote it).")
  if len(files) > MAX_FILES:
    raise ValueError(f"{where} lists {len(files)} files, more than {MAX_FILES}.")
  root = paths.absolute(directory)
  for rel, info in files.items():
    _check_record(where, rel, info)
    path = os.path.join(root, rel)
    if os.path.islink(path) or paths.absolute(path) != os.path.normpath(path):
      raise ValueError(f"{path} is a symbolic link (or below one); a checkpoint holds plain "
                       "files only.")
    if not os.path.isfile(path):
      raise ValueError(f"{path} is missing: the checkpoint {directory} is incomplete.")
    if os.path.getsize(path) != info["bytes"]:
      raise ValueError(f"{path} has {os.path.getsize(path)} bytes, the manifest says "
                       f"{info['bytes']}: the file is truncated or was modified.")
  return dict(files)


def _check_hash(path: str, digest: str, info: Mapping[str, Any]) -> None:
  if digest != info["sha256"]:
    raise ValueError(f"{path} is corrupted or was modified: its SHA-256 {digest[:16]}... "
                     f"differs from the manifest's {info['sha256'][:16]}...")


def verification_enabled() -> bool:
  return os.environ.get(NO_VERIFY_ENV, "") in ("", "0")


def verify_files(directory: str, manifest: Mapping[str, Any]) -> None:
  """Every recorded file present, of its size and SHA-256 (raises naming the first bad file)."""
  for rel, info in recorded_files(directory, manifest).items():
    _check_hash(os.path.join(directory, rel), sha256(os.path.join(directory, rel)), info)


def copy_checked(jobs: Iterable[tuple[str, str, Mapping[str, int]]], workers: int = 0) -> int:
  """Copies (source, destination, record) files, checking each SHA-256 on the way (one read, one
  write); files run in parallel threads (hashlib and file I/O release the GIL). Returns bytes."""

  def one(job):
    source, dest, info = job
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    digest, buf = hashlib.sha256(), bytearray(_CHUNK)
    view = memoryview(buf)
    with open(source, "rb") as src, open(dest, "wb") as dst:
      while n := src.readinto(buf):
        digest.update(view[:n])
        dst.write(view[:n])
    _check_hash(source, digest.hexdigest(), info)
    return info["bytes"]

  with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
    return sum(pool.map(one, list(jobs)))
