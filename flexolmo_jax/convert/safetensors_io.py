"""Streaming safetensors: write shards tensor by tensor, read a Hugging Face directory's tensors.

A safetensors file is an 8-byte little-endian header length, a JSON header naming every tensor's
dtype, shape and byte range, then the raw bytes. Since every shape is known before any weight is
read, :class:`ShardedWriter` writes each shard's header first and then each tensor's bytes as it
arrives: peak memory is the tensor being written, with no shard buffer. Shards are filled in order
up to ``shard_bytes`` (``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``,
or one ``model.safetensors``), the layout transformers reads.
"""
from __future__ import annotations

import json
import os
import re
import struct
from typing import Any, Iterator, Mapping, Sequence

import ml_dtypes
import numpy as np

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DTYPES = {"F32": np.dtype(np.float32), "BF16": np.dtype(ml_dtypes.bfloat16),
          "F16": np.dtype(np.float16), "F64": np.dtype(np.float64)}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
  """``"5GB"`` -> 5e9 bytes (decimal units as Hugging Face uses; ``GiB`` for binary)."""
  if isinstance(text, int):
    return text
  m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(text))
  if not m or m.group(2).upper() not in _UNITS:
    raise ValueError(f"Shard size {text!r}: write a number with a unit, e.g. 5GB or 500MB.")
  return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def dtype_name(dtype) -> str:
  for name, dt in DTYPES.items():
    if np.dtype(dtype) == dt:
      return name
  raise ValueError(f"No safetensors dtype for {np.dtype(dtype)}.")


class ShardedWriter:
  """Writes the planned tensors, in plan order, into shards of at most ``shard_bytes``."""

  def __init__(self, directory: str, plan: Sequence[tuple[str, tuple[int, ...]]], dtype: str,
               shard_bytes: int, metadata: Mapping[str, str] | None = None):
    self.directory, self.dtype = directory, DTYPES[dtype]
    self.metadata = {"format": "pt", **(metadata or {})}
    self.shards: list[list[tuple[str, tuple[int, ...], int]]] = [[]]
    used = 0
    for name, shape in plan:
      nbytes = int(np.prod(shape, dtype=np.int64)) * self.dtype.itemsize
      if self.shards[-1] and used + nbytes > shard_bytes:
        self.shards.append([])
        used = 0
      self.shards[-1].append((name, tuple(shape), nbytes))
      used += nbytes
    n = len(self.shards)
    self.files = ([SINGLE] if n == 1 else
                  [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
    self.total_bytes = sum(b for shard in self.shards for _, _, b in shard)
    self._queue: Iterator[tuple[int, str, tuple[int, ...]]] = iter(
        [(i, name, shape) for i, shard in enumerate(self.shards) for name, shape, _ in shard])
    self._shard, self._fh, self.written = -1, None, 0

  def _open(self, index: int) -> None:
    if self._fh:
      self._fh.close()
    header, offset = {"__metadata__": self.metadata}, 0
    for name, shape, nbytes in self.shards[index]:
      header[name] = {"dtype": dtype_name(self.dtype), "shape": list(shape),
                      "data_offsets": [offset, offset + nbytes]}
      offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    self._fh = open(os.path.join(self.directory, self.files[index]), "wb")
    self._fh.write(struct.pack("<Q", len(raw)) + raw)
    self._shard = index

  def add(self, name: str, array: np.ndarray) -> None:
    """The next planned tensor; anything else is a bug in the caller and raises."""
    index, want, shape = next(self._queue, (None, None, None))
    if name != want or tuple(array.shape) != shape:
      raise RuntimeError(f"Export wrote {name} {tuple(array.shape)} where the plan has "
                         f"{want} {shape}.")
    if index != self._shard:
      self._open(index)
    data = np.ascontiguousarray(np.asarray(array).astype(self.dtype, copy=False))
    self._fh.write(data.reshape(-1).view(np.uint8))   # raw bytes, bf16 included
    self.written += data.nbytes

  def close(self) -> None:
    if next(self._queue, None) is not None:
      raise RuntimeError("Export ended before every planned tensor was written.")
    if self._fh:
      self._fh.close()
    if len(self.files) > 1:
      weight_map = {name: self.files[i] for i, shard in enumerate(self.shards)
                    for name, _, _ in shard}
      with open(os.path.join(self.directory, INDEX), "w") as fh:
        json.dump({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, fh,
                  indent=2)


def _check_entry(path: str, name: str, info: Any) -> None:
  """One tensor of a safetensors header, as untrusted input."""
  where = f"{path}: tensor {name!r}"
  if not isinstance(info, dict):
    raise ValueError(f"{where}: not a JSON object.")
  if info.get("dtype") not in DTYPES:
    raise ValueError(f"{where} has dtype {info.get('dtype')!r}, not one of {sorted(DTYPES)}.")
  shape, offsets = info.get("shape"), info.get("data_offsets")
  integers = lambda v: isinstance(v, list) and all(
      isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)
  if not integers(shape) or len(shape) > 8:
    raise ValueError(f"{where}: shape {shape!r} is not a list of at most 8 sizes.")
  if not integers(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
    raise ValueError(f"{where}: data_offsets {offsets!r} is not [begin, end] with "
                     "0 <= begin <= end.")


class SafetensorsFile:
  """One safetensors file read by its header: tensors come from a memory map, any dtype in
  ``DTYPES`` (bf16 included, which numpy-only readers refuse)."""

  def __init__(self, path: str):
    self.path = path
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
      raw = fh.read(8)
      if len(raw) < 8:
        raise ValueError(f"{path}: not a safetensors file (shorter than its header length).")
      (n,) = struct.unpack("<Q", raw)
      if n > size - 8:
        raise ValueError(f"{path}: header length {n} exceeds the file (truncated?).")
      try:
        header = json.loads(fh.read(n))
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: the header is not JSON ({e}).") from None
    if not isinstance(header, dict):
      raise ValueError(f"{path}: the header is not a JSON object.")
    self.metadata = header.pop("__metadata__", {}) or {}
    self.start = 8 + n
    self.entries = header
    spans = []
    for name, info in header.items():
      _check_entry(path, name, info)
      begin, end = info["data_offsets"]
      want = int(np.prod(info["shape"], dtype=np.int64)) * DTYPES[info["dtype"]].itemsize
      if end - begin != want:
        raise ValueError(f"{path}: tensor {name!r} has {end - begin} bytes for shape "
                         f"{info['shape']} ({want} expected).")
      spans.append((begin, end, name))
    # As the reference library requires: the tensors tile the data exactly, in offset order,
    # with no gap and no overlap, and end where the file ends.
    position = 0
    for begin, end, name in sorted(spans):
      if begin != position:
        raise ValueError(f"{path}: tensor {name!r} starts at byte {begin} of the data, expected "
                         f"{position} (overlapping or non-contiguous data_offsets).")
      position = end
    if self.start + position != size:
      raise ValueError(f"{path}: the tensors cover {position} bytes of data, the file holds "
                       f"{size - self.start} (truncated, or bytes no tensor accounts for).")
    self._map = np.memmap(path, np.uint8, mode="r") if size else None

  def keys(self) -> list[str]:
    return list(self.entries)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.entries[name]["shape"])

  def get(self, name: str) -> np.ndarray:
    info = self.entries[name]
    begin, end = info["data_offsets"]
    raw = self._map[self.start + begin:self.start + end]
    return np.array(raw.view(DTYPES[info["dtype"]]).reshape(info["shape"]))


class TensorReader:
  """Reads tensors by name from a Hugging Face directory (one file or an index of shards)."""

  def __init__(self, directory: str):
    index, single = os.path.join(directory, INDEX), os.path.join(directory, SINGLE)
    if os.path.exists(index):
      try:
        with open(index) as fh:
          weight_map = json.load(fh)["weight_map"]
      except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index}: not a safetensors index with a weight_map ({e}).") from None
      if not isinstance(weight_map, dict) or not all(
          isinstance(f, str) and re.fullmatch(r"[A-Za-z0-9_.-]+\.safetensors", f)
          and not f.startswith(".") for f in weight_map.values()):
        raise ValueError(f"{index}: the weight_map must name shard files of this directory "
                         "(plain '*.safetensors' names).")
    elif os.path.exists(single):
      weight_map = None
    else:
      raise FileNotFoundError(f"{directory} holds no {SINGLE} and no {INDEX}; safetensors "
                              "weights are required (convert .bin checkpoints first).")
    files = sorted(set(weight_map.values())) if weight_map else [SINGLE]
    self._files = {}
    for f in files:
      path = os.path.join(directory, f)
      if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is named by {index} but is missing.")
      self._files[f] = SafetensorsFile(path)
    self.where = weight_map or {k: SINGLE for k in self._files[SINGLE].keys()}
    for name, f in self.where.items():
      if name not in self._files[f].entries:
        raise ValueError(f"{index} puts tensor {name!r} in {f}, which does not hold it.")

  def names(self) -> set[str]:
    return set(self.where)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._files[self.where[name]].shape(name)

  def get(self, name: str) -> np.ndarray:
    if name not in self.where:
      raise KeyError(f"Missing tensor {name!r}.")
    return self._files[self.where[name]].get(name)
