"""What each of the demo's outputs was built from, so that a reused output is never stale.

A stage is skipped when its output exists. By that rule alone an output outlives a change to
its inputs: a router tuned again by hand, an expert trained again after its directory was
removed. The evaluations cached in ``eval/`` would then report the models that were there
before, beside the ones that are there now. So every output records the digests of its inputs
(``provenance.json`` in the work directory) and is reused only while they are the same; an
output whose inputs changed is built again, and the demo says which input changed.

A model's digest is its manifest's: the manifest lists every file of the model with its
sha256 (its ``files``), so two models with the same manifest hold the same bytes. A
file's digest (the FlexMix-mini card) is its own. Settings that select a view of a model (the
experts opted in or out) are recorded as they are.

An output without a record (one an earlier version of the demo built, or one whose stage was
interrupted between writing it and recording it) is taken as it is, and its inputs are
recorded then.
"""
from __future__ import annotations

import hashlib
import json
import os

from flexolmo_jax.checkpoint import store
from flexolmo_jax.demo.processes import write_json

RECORD = "provenance.json"


def digest(path: str) -> str:
  """sha256 of a file, or of the manifest of the saved model at ``path`` (a model directory or
  the run directory that holds it)."""
  if os.path.isdir(path):
    path = os.path.join(store.saved_dir(path), store.MANIFEST)
  with open(path, "rb") as fh:
    return hashlib.sha256(fh.read()).hexdigest()


class Provenance:
  """The record of a work directory: ``{output: {input: digest or setting}}``, every path
  relative to the work directory."""

  def __init__(self, workdir: str):
    self.workdir = os.path.abspath(workdir)
    self.file = os.path.join(self.workdir, RECORD)
    self.records: dict[str, dict[str, str]] = {}
    if os.path.exists(self.file):
      with open(self.file) as fh:
        try:
          self.records = json.load(fh)
        except json.JSONDecodeError as e:
          raise ValueError(f"{self.file}: not valid JSON ({e.msg}, line {e.lineno}); remove "
                           "it to have every output taken as it is, or rebuild with --fresh."
                           ) from None
      if not isinstance(self.records, dict):
        raise ValueError(f"{self.file}: not a JSON object; remove it or rebuild with --fresh.")

  def key(self, path: str) -> str:
    rel = os.path.relpath(os.path.abspath(path), self.workdir)
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
      raise ValueError(f"{path} is outside the work directory {self.workdir}.")
    return rel

  def inputs(self, *paths: str, **settings) -> dict[str, str]:
    """{input: digest} of models and files in the work directory, and ``settings`` as text."""
    return {**{self.key(p): digest(p) for p in paths},
            **{f"setting:{k}": str(v) for k, v in settings.items()}}

  def changed(self, output: str, inputs: dict[str, str]) -> list[str]:
    """The inputs that differ from those ``output`` (which exists) was built from; none for an
    output without a record, whose inputs are recorded now."""
    was = self.records.get(self.key(output))
    if was is None:
      self.record(output, inputs)
      return []
    return sorted(k for k in {**was, **inputs} if was.get(k) != inputs.get(k))

  def record(self, output: str, inputs: dict[str, str]) -> None:
    self.records[self.key(output)] = dict(inputs)
    write_json(self.file, self.records, indent=1, sort_keys=True)

  def remove_stale(self, output: str, directory: str, changed: list[str]) -> None:
    """Says why ``output`` is built again and removes ``directory`` (the output or the run
    directory holding it, with the checkpoints a rerun would otherwise resume from)."""
    import shutil

    self.key(directory)                   # inside the work directory, or refused
    print(f"  {self.key(output)} was built from another {', '.join(changed)}: building it again")
    if os.path.isdir(directory):
      shutil.rmtree(directory)
    elif os.path.exists(directory):
      os.remove(directory)
    self.records.pop(self.key(output), None)
    write_json(self.file, self.records, indent=1, sort_keys=True)
