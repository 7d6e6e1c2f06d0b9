"""An owner's local corpus (text files, directories, JSONL) -> a TFDS dataset on the owner's disk.

Documents are validated in a first pass (nothing is written when the input is bad: errors name the
file and line) and then written by TFDS, which builds into a temporary directory and renames it at
the end, so an interrupted preparation never leaves a dataset that looks complete. Each document's
split (train / validation) is decided by a stable hash of its text, so adding files never moves an
existing document to the other split.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
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
  path: str               # the file, as found from the spec's paths
  line: int | None        # the JSONL line, or None for a whole-file document
  text: str

  @property
  def key(self) -> str:
    """Where the document is, for messages: "<file>" or "<file>:<line>"."""
    return self.path if self.line is None else f"{self.path}:{self.line}"


@dataclasses.dataclass
class SourceStats:
  files: int = 0
  documents: dict = dataclasses.field(default_factory=lambda: {"train": 0, "validation": 0})
  utf8_bytes: dict = dataclasses.field(default_factory=lambda: {"train": 0, "validation": 0})
  empty_skipped: int = 0
  invalid_utf8_replaced: int = 0
  links_skipped: int = 0

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def hash_unit(text: str) -> float:
  """A document's stable position in [0, 1) (content only): the split is ``hash_unit < fraction``."""
  digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
  return int.from_bytes(digest[:8], "big") / 2**64


def split_of(text: str, validation_fraction: float) -> str:
  """'validation' for a stable hash-chosen share of documents, else 'train' (content-only)."""
  return "validation" if hash_unit(text) < validation_fraction else "train"


def _pattern(pattern: str) -> re.Pattern:
  """A glob pattern over relative paths as a regex: ``**`` is any number of directories, ``*``
  and ``?`` stay within one name, ``[...]`` (``[!...]``) is a character class."""
  components = pattern.split("/")
  regex = ""
  for index, component in enumerate(components):
    last = index == len(components) - 1
    if component == "**":
      regex += ".*" if last else "(?:[^/]+/)*"
      continue
    i = 0
    while i < len(component):
      c, end = component[i], component.find("]", i + 2)
      if c == "*":
        regex += "[^/]*"
      elif c == "?":
        regex += "[^/]"
      elif c == "[" and end != -1:
        inner = component[i + 1:end]
        regex += "[" + ("^" + inner[1:] if inner.startswith("!") else inner) + "]"
        i = end
      else:
        regex += re.escape(c)
      i += 1
    regex += "" if last else "/"
  return re.compile(regex)


def _directory_files(root: str, pattern: str, stats: SourceStats) -> list[str]:
  """The regular files under ``root`` matching ``pattern``, symbolic links not followed (each is
  counted and skipped: a link can lead out of the owner's directory, or loop); names starting
  with '.' are hidden, as in a shell's glob."""
  regex, found = _pattern(pattern), []
  for directory, dirs, files in os.walk(root, followlinks=False):
    for name in list(dirs):
      if name.startswith(".") or os.path.islink(os.path.join(directory, name)):
        stats.links_skipped += os.path.islink(os.path.join(directory, name))
        dirs.remove(name)
    for name in files:
      path = os.path.join(directory, name)
      if name.startswith("."):
        continue
      if os.path.islink(path):
        stats.links_skipped += 1
      elif os.path.isfile(path) and regex.fullmatch(os.path.relpath(path, root)):
        found.append(path)
  return sorted(found)


def list_files(spec: SourceSpec, stats: SourceStats | None = None) -> list[str]:
  stats = SourceStats() if stats is None else stats
  files = []
  for path in spec.paths:
    if os.path.isdir(path):
      found = _directory_files(path, spec.pattern, stats)
      if not found:
        raise DataError(f"{path}: the directory has no files matching {spec.pattern!r}"
                        + (f" ({stats.links_skipped} symbolic links not followed)."
                           if stats.links_skipped else "."))
      files.extend(found)
    elif os.path.isfile(path):
      files.append(path)
    else:
      raise DataError(f"{path}: no such file or directory.")
  return files


# Bumped whenever the same inputs would be written differently (the example keys, hence the order).
PREPARED_FORMAT = 2


def source_key(spec: SourceSpec) -> str:
  """What a prepared dataset is keyed by: the spec, then every input file's path, size,
  modification time and the SHA-256 of its bytes. Changed inputs give another key, and so does
  another way of writing the dataset (``PREPARED_FORMAT``)."""
  digest = hashlib.sha256(json.dumps({"format": PREPARED_FORMAT, **dataclasses.asdict(spec)},
                                     sort_keys=True).encode())
  for path in list_files(spec):
    info = os.stat(path)
    digest.update(f"\n{os.path.abspath(path)}|{info.st_size}|{info.st_mtime_ns}|".encode())
    with open(path, "rb") as fh:
      while chunk := fh.read(8 << 20):
        digest.update(chunk)
  return digest.hexdigest()


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
      yield Document(path, lineno, text)


def iter_documents(spec: SourceSpec, stats: SourceStats | None = None) -> Iterator[Document]:
  """Every non-empty document of the spec, in a deterministic order."""
  stats = SourceStats() if stats is None else stats
  for path in list_files(spec, stats):
    stats.files += 1
    if _file_format(path, spec) == "jsonl":
      docs = _jsonl_documents(path, spec, stats)
    else:
      with open(path, "rb") as fh:
        docs = iter([Document(path, None, _decode(fh.read(), path, spec, stats))])
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
  if stats.links_skipped:
    log.warning("%d symbolic link(s) in %s skipped: links in an owner's data are not followed.",
                stats.links_skipped, list(spec.paths))
  return stats


def example_keys(spec: SourceSpec) -> dict[str, str]:
  """{file: its name relative to the spec path it came from, behind that path's index}.

  TFDS orders a prepared dataset by a hash of each example's key, so the key must not hold the
  directory the data happens to sit in: the same files prepared anywhere give the same order,
  hence the same batches (the i-th spec path is ``i/``, a file under a directory keeps its
  relative name)."""
  keys = {}
  for i, path in enumerate(spec.paths):
    if os.path.isdir(path):
      for file in _directory_files(path, spec.pattern, SourceStats()):
        keys.setdefault(file, f"{i}/{os.path.relpath(file, path)}")
    else:
      keys.setdefault(path, f"{i}/{os.path.basename(path)}")
  return keys


def _split_examples(spec: SourceSpec, split: str):
  keys = example_keys(spec)
  for doc in iter_documents(spec):
    if split_of(doc.text, spec.validation_fraction) == split:
      name = keys[doc.path]
      yield (name if doc.line is None else f"{name}:{doc.line}"), {"text": doc.text}


def dataset_name(name: str) -> str:
  """TFDS dataset names are snake_case identifiers; the domain name must map onto one."""
  tfds_name = name.lower().replace("-", "_")
  if not re.fullmatch(r"[a-z][a-z0-9_]{0,63}", tfds_name):
    raise DataError(f"Invalid domain name {name!r}: 1 to 64 letters, digits, '_' or '-', "
                    "starting with a letter.")
  return tfds_name


def prepare(name: str, spec: SourceSpec, data_dir: str, *, version: str = "1.0.0",
            overwrite: bool = False, changed: str = "refuse"):
  """Builds (or reuses) the TFDS dataset ``name`` from the spec under ``data_dir``.

  Returns ``(builder, stats)``. A complete dataset is reused only when it was prepared from the
  same inputs (:func:`source_key`: paths, sizes, modification times, bytes); when they changed,
  ``changed="refuse"`` raises (``flexolmo data prepare``: pass ``overwrite``) and ``"rebuild"``
  prepares it again and says so (the datasets a run prepares for itself). An interrupted build
  leaves only TFDS's temporary directory, never a dataset that loads.
  """
  import tensorflow_datasets as tfds

  tfds_name = dataset_name(name)
  stats = scan(spec)   # all validation happens before anything is written
  key = source_key(spec)
  final_dir = os.path.join(data_dir, tfds_name, version)
  # Complete = TFDS finished (dataset_info.json) *and* our record was written after it.
  if is_prepared(final_dir) and not overwrite:
    if _recorded_key(final_dir) == key:
      return tfds.builder_from_directory(final_dir), stats
    if changed != "rebuild":
      raise DataError(f"{final_dir} was prepared from other inputs than {list(spec.paths)} as "
                      "they are now (a file was added, removed or changed); pass --overwrite to "
                      "prepare it again, or use a new name.")
    print(f"{name}: its inputs changed since {final_dir} was prepared; preparing it again.",
          flush=True)
  if os.path.exists(final_dir):
    shutil.rmtree(final_dir)
  splits = {s: _split_examples(spec, s) for s in ("train", "validation") if stats.documents[s]}
  try:
    with console.library_chatter(), _scratch_tempdir(data_dir):
      tfds.dataset_builders.store_as_tfds_dataset(
          name=tfds_name, version=version,
          features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
          split_datasets=splits, data_dir=data_dir,
          description=f"flexolmo_jax local corpus {name!r} from {list(spec.paths)}")
  except (AssertionError, OSError, DataError) as e:
    raise DataError(f"{list(spec.paths)} changed while {name!r} was being prepared ({e}); "
                    "nothing was kept: run the command again.") from None
  if source_key(spec) != key:
    shutil.rmtree(final_dir, ignore_errors=True)
    raise DataError(f"{list(spec.paths)} changed while {name!r} was being prepared; nothing "
                    "was kept: run the command again.")
  tmp = os.path.join(final_dir, SOURCE_RECORD + ".tmp")
  with open(tmp, "w") as fh:
    json.dump({"spec": dataclasses.asdict(spec), "stats": stats.to_json(), "source_key": key},
              fh, indent=1)
  os.replace(tmp, os.path.join(final_dir, SOURCE_RECORD))
  return tfds.builder_from_directory(final_dir), stats


SOURCE_RECORD = "flexolmo_source.json"


@contextlib.contextmanager
def _scratch_tempdir(data_dir: str):
  """Python's temporary directory pointed into a scratch directory under ``data_dir``, removed
  afterwards. Setting up a builder for a dataset not prepared yet, TFDS creates an empty
  temporary directory (to fetch published metadata, which it then does not) and never removes
  it: without this, every preparation (every training run's own data) left one in /tmp."""
  os.makedirs(data_dir, exist_ok=True)
  scratch, before = tempfile.mkdtemp(prefix=".prepare-", dir=data_dir), tempfile.tempdir
  tempfile.tempdir = scratch
  try:
    yield
  finally:
    tempfile.tempdir = before
    shutil.rmtree(scratch, ignore_errors=True)


def is_prepared(dataset_dir: str) -> bool:
  return all(os.path.exists(os.path.join(dataset_dir, f))
             for f in ("dataset_info.json", SOURCE_RECORD))


def prepared_below(path: str) -> str | None:
  """The prepared dataset directly under ``path`` (TFDS's ``NAME/VERSION`` layout: ``path`` is
  the NAME directory), or None."""
  if not os.path.isdir(path) or is_prepared(path):
    return None
  for name in sorted(os.listdir(path)):
    if is_prepared(os.path.join(path, name)):
      return os.path.join(path, name)
  return None


def _recorded_key(final_dir: str) -> str | None:
  try:
    with open(os.path.join(final_dir, SOURCE_RECORD)) as fh:
      return json.load(fh).get("source_key")
  except (OSError, ValueError, AttributeError):
    return None


def source_label(path: str) -> str:
  """How a data card names a source without its location: ``code.jsonl``, ``flexmix_code/1.0.0``."""
  path = os.path.normpath(os.fspath(path))
  if is_prepared(path):
    return f"{os.path.basename(os.path.dirname(path))}/{os.path.basename(path)}"
  return os.path.basename(path)
