"""An owner's local corpus (text files, directories, JSONL) -> a TFDS dataset on the owner's disk.

Documents are validated in a first pass (nothing is written when the input is bad: errors name the
file and line) and then written by TFDS, which builds into a temporary directory and renames it at
the end, so an interrupted preparation never leaves a dataset that looks complete. Each document's
split (train / validation) is decided by a stable hash of its text, so adding files never moves an
existing document to the other split.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import shutil
from typing import Iterator

from flexolmo_jax import console

log = logging.getLogger(__name__)

FORMATS = ("auto", "text", "jsonl")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


class DataError(ValueError):
  """Bad input data; the message names the file (and line) and what to do."""


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  """Where an owner's documents are and how to read them.

  ``paths``: files or directories (directories are read recursively by ``pattern``).
  ``format``: ``text`` (one document per file), ``jsonl`` (one per line, text in ``field``) or
  ``auto`` (by suffix: .jsonl/.json/.ndjson are JSONL, anything else text).
  ``invalid_utf8``: ``replace`` (decode with U+FFFD and count it in a warning) or ``error``.
  """

  paths: tuple[str, ...]
  format: str = "auto"
  field: str = "text"
  pattern: str = "**/*"
  invalid_utf8: str = "replace"
  validation_fraction: float = 0.05

  def __post_init__(self):
    object.__setattr__(self, "paths", tuple(os.fspath(p) for p in self.paths))
    if not self.paths:
      raise DataError("No data paths given.")
    if self.format not in FORMATS:
      raise DataError(f"Unknown format {self.format!r}; choose one of {FORMATS}.")
    if self.invalid_utf8 not in ("replace", "error"):
      raise DataError(f"invalid_utf8={self.invalid_utf8!r}; choose 'replace' or 'error'.")
    if not 0.0 <= self.validation_fraction < 1.0:
      raise DataError(f"validation_fraction={self.validation_fraction} must be in [0, 1).")


@dataclasses.dataclass(frozen=True)
class Document:
  key: str     # unique and stable: "<file>" or "<file>:<line>"
  text: str


@dataclasses.dataclass
class SourceStats:
  files: int = 0
  documents: dict = dataclasses.field(default_factory=lambda: {"train": 0, "validation": 0})
  utf8_bytes: dict = dataclasses.field(default_factory=lambda: {"train": 0, "validation": 0})
  empty_skipped: int = 0
  invalid_utf8_replaced: int = 0

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def hash_unit(text: str) -> float:
  """A document's stable position in [0, 1) (content only): the split is ``hash_unit < fraction``."""
  digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
  return int.from_bytes(digest[:8], "big") / 2**64


def split_of(text: str, validation_fraction: float) -> str:
  """'validation' for a stable hash-chosen share of documents, else 'train' (content-only)."""
  return "validation" if hash_unit(text) < validation_fraction else "train"


def list_files(spec: SourceSpec) -> list[str]:
  files = []
  for path in spec.paths:
    if os.path.isdir(path):
      found = sorted(p for p in glob.glob(os.path.join(path, spec.pattern), recursive=True)
                     if os.path.isfile(p))
      if not found:
        raise DataError(f"{path}: the directory has no files matching {spec.pattern!r}.")
      files.extend(found)
    elif os.path.isfile(path):
      files.append(path)
    else:
      raise DataError(f"{path}: no such file or directory.")
  return files


def _decode(raw: bytes, where: str, spec: SourceSpec, stats: SourceStats) -> str:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    if spec.invalid_utf8 == "error":
      raise DataError(f"{where}: not valid UTF-8 (byte {e.start}); fix the file or use "
                      "invalid_utf8='replace'.") from None
    stats.invalid_utf8_replaced += 1
    return raw.decode("utf-8", errors="replace")


def _file_format(path: str, spec: SourceSpec) -> str:
  if spec.format != "auto":
    return spec.format
  return "jsonl" if path.lower().endswith(JSONL_SUFFIXES) else "text"


def _jsonl_documents(path, spec, stats) -> Iterator[Document]:
  with open(path, "rb") as fh:
    for lineno, raw in enumerate(fh, start=1):
      line = _decode(raw, f"{path}:{lineno}", spec, stats).strip()
      if not line:
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}).") from None
      if not isinstance(record, dict) or spec.field not in record:
        raise DataError(f"{path}:{lineno}: no field {spec.field!r} in this JSON record "
                        "(set the text field with --field).")
      text = record[spec.field]
      if not isinstance(text, str):
        raise DataError(f"{path}:{lineno}: field {spec.field!r} is {type(text).__name__}, "
                        "not a string.")
      yield Document(f"{path}:{lineno}", text)


def iter_documents(spec: SourceSpec, stats: SourceStats | None = None) -> Iterator[Document]:
  """Every non-empty document of the spec, in a deterministic order."""
  stats = SourceStats() if stats is None else stats
  for path in list_files(spec):
    stats.files += 1
    if _file_format(path, spec) == "jsonl":
      docs = _jsonl_documents(path, spec, stats)
    else:
      with open(path, "rb") as fh:
        docs = iter([Document(path, _decode(fh.read(), path, spec, stats))])
    for doc in docs:
      if not doc.text:
        stats.empty_skipped += 1
        continue
      yield doc


def scan(spec: SourceSpec) -> SourceStats:
  """Validates every document (raising DataError on bad input) and counts them per split."""
  stats = SourceStats()
  for doc in iter_documents(spec, stats):
    split = split_of(doc.text, spec.validation_fraction)
    stats.documents[split] += 1
    stats.utf8_bytes[split] += len(doc.text.encode("utf-8"))
  if not sum(stats.documents.values()):
    raise DataError(f"No non-empty documents in {list(spec.paths)} "
                    f"({stats.files} file(s), {stats.empty_skipped} empty).")
  if stats.invalid_utf8_replaced:
    log.warning("%d document(s)/line(s) in %s were not valid UTF-8 and were decoded with "
                "replacement characters.", stats.invalid_utf8_replaced, list(spec.paths))
  if stats.empty_skipped:
    log.warning("%d empty document(s) skipped in %s.", stats.empty_skipped, list(spec.paths))
  return stats


def _split_examples(spec: SourceSpec, split: str):
  for doc in iter_documents(spec):
    if split_of(doc.text, spec.validation_fraction) == split:
      yield doc.key, {"text": doc.text}


def dataset_name(name: str) -> str:
  """TFDS dataset names are snake_case identifiers; the domain name must map onto one."""
  tfds_name = name.lower().replace("-", "_")
  if not tfds_name.replace("_", "").isalnum() or not tfds_name[0].isalpha():
    raise DataError(f"Invalid domain name {name!r}: use letters, digits, '_' or '-', "
                    "starting with a letter.")
  return tfds_name


def prepare(name: str, spec: SourceSpec, data_dir: str, *, version: str = "1.0.0",
            overwrite: bool = False):
  """Builds (or reuses) the TFDS dataset ``name`` from the spec under ``data_dir``.

  Returns ``(builder, stats)``. A dataset that is already complete is reused unless
  ``overwrite``; an interrupted build leaves only TFDS's temporary directory, never a dataset
  that loads.
  """
  import tensorflow_datasets as tfds

  tfds_name = dataset_name(name)
  stats = scan(spec)   # all validation happens before anything is written
  final_dir = os.path.join(data_dir, tfds_name, version)
  # Complete = TFDS finished (dataset_info.json) *and* our record was written after it.
  if is_prepared(final_dir) and not overwrite:
    _check_same_source(final_dir, spec, stats)
    return tfds.builder_from_directory(final_dir), stats
  if os.path.exists(final_dir):
    shutil.rmtree(final_dir)
  splits = {s: _split_examples(spec, s) for s in ("train", "validation") if stats.documents[s]}
  with console.library_chatter():
    tfds.dataset_builders.store_as_tfds_dataset(
        name=tfds_name, version=version,
        features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
        split_datasets=splits, data_dir=data_dir,
        description=f"flexolmo_jax local corpus {name!r} from {list(spec.paths)}")
  tmp = os.path.join(final_dir, SOURCE_RECORD + ".tmp")
  with open(tmp, "w") as fh:
    json.dump({"spec": dataclasses.asdict(spec), "stats": stats.to_json()}, fh, indent=1)
  os.replace(tmp, os.path.join(final_dir, SOURCE_RECORD))
  return tfds.builder_from_directory(final_dir), stats


SOURCE_RECORD = "flexolmo_source.json"


def is_prepared(dataset_dir: str) -> bool:
  return all(os.path.exists(os.path.join(dataset_dir, f))
             for f in ("dataset_info.json", SOURCE_RECORD))


def _check_same_source(final_dir: str, spec: SourceSpec, stats: SourceStats) -> None:
  path = os.path.join(final_dir, SOURCE_RECORD)
  with open(path) as fh:
    recorded = json.load(fh)
  if recorded["stats"]["documents"] != stats.documents:
    raise DataError(
        f"{final_dir} was prepared from different data ({recorded['stats']['documents']} "
        f"documents, now {stats.documents}); pass overwrite=True (--overwrite) to rebuild it, or "
        "use a new name.")


def source_label(path: str) -> str:
  """How a data card names a source without its location: ``code.jsonl``, ``flexmix_code/1.0.0``."""
  path = os.path.normpath(os.fspath(path))
  if is_prepared(path):
    return f"{os.path.basename(os.path.dirname(path))}/{os.path.basename(path)}"
  return os.path.basename(path)
