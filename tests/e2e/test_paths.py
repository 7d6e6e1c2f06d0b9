"""Every spelling of a path gives the same result: relative, ``./``, ``../``, ``~``, trailing
slashes and symlinked directories, against absolute paths; run directories stand for their model;
records read by later commands do not depend on the directory they were written from."""
import filecmp
import functools
import json
import os
from unittest import mock
import jax
import numpy as np
import pytest
from flexolmo_jax import cli, sharding
from flexolmo_jax.checkpoint import store
from flexolmo_jax.convert import hf
from tests.artifacts import owner_data
from tests.helpers import save_random_public


def _same_tree(a, b):
  """Two saved directories hold the same things: every file byte for byte, except Orbax's
  ``params/`` (its files record when and where they were written), whose parameters must be
  equal bitwise instead."""
  cmp = filecmp.dircmp(a, b)
  assert not cmp.left_only and not cmp.right_only, (a, cmp.left_only, cmp.right_only)
  for name in cmp.common_files:
    if name == hf.NAMES_FILE:     # records where it was exported from: each run's own input
      want, got = (json.load(open(os.path.join(d, name))) for d in (a, b))
      assert {**got, "source": None} == {**want, "source": None}, os.path.join(b, name)
    elif name != store.MANIFEST:
      with open(os.path.join(a, name), "rb") as fa, open(os.path.join(b, name), "rb") as fb:
        assert fa.read() == fb.read(), os.path.join(b, name)
  for name in cmp.common_dirs:
    if name == store.PARAMS:
      want, got = store.load_params(a), store.load_params(b)
      for path, leaf in store.flatten(want).items():
        np.testing.assert_array_equal(np.asarray(store.flatten(got)[path]), np.asarray(leaf),
                                      err_msg=os.path.join(b, path))
    else:
      _same_tree(os.path.join(a, name), os.path.join(b, name))


def _manifest(path):
  """A manifest without what legitimately differs between two runs: timings and the
  per-file records of Orbax's timestamped metadata."""
  with open(os.path.join(path, store.MANIFEST)) as fh:
    manifest = json.load(fh)
  manifest.pop(store.FILES, None)
  manifest.get("data_card", {}).pop("seconds", None)
  return manifest


@pytest.mark.slow
def test_commands_give_the_same_outputs_for_every_spelling_of_their_paths(tmp_path, monkeypatch):
  """train-expert, merge, eval and export-hf from a working directory with relative paths, with
  ``./``, ``../``, ``~``, trailing slashes and a symlinked directory: the same outputs, bitwise,
  as with absolute paths."""
  work = tmp_path / "work"
  (work / "sub").mkdir(parents=True)
  save_random_public(work / "public")
  owner_data(work / "code.jsonl", documents=80)
  os.symlink(work, tmp_path / "link")
  monkeypatch.setenv("HOME", str(work))
  spellings = {                                   # name: (working directory, path prefix)
      "absolute": (tmp_path, f"{work}/"), "relative": (work, ""), "dot": (work, "./"),
      "dotdot": (work / "sub", "../"), "home": (tmp_path, "~/"), "symlink": (tmp_path, "link/")}
  one_device = functools.partial(sharding.make_mesh, devices=jax.devices()[:1])
  for name, (cwd, p) in spellings.items():
    monkeypatch.chdir(cwd)
    with mock.patch.object(sharding, "make_mesh", one_device):
      assert cli.main(["train-expert", "--public", f"{p}public/", "--name", "code",
                       "--data", f"{p}code.jsonl", "--out", f"{p}runs/{name}/", "--steps", "2",
                       "--batch-size", "2", "--seq-len", "32", "--router-init", "random",
                       "--log-every", "1", "--checkpoint-every", "2"]) == 0
    assert cli.main(["merge", "--public", f"{p}public", "--expert", f"{p}runs/{name}",
                     "--out", f"{p}merged/{name}/"]) == 0
    assert cli.main(["eval", "--model", f"{p}merged/{name}", "--data", f"code={p}code.jsonl",
                     "--seq-len", "32", "--batch-size", "4", "--json", f"{p}eval/{name}.json",
                     "--data-dir", f"{p}eval/data"]) == 0
    assert cli.main(["export-hf", "--model", f"{p}merged/{name}/", "--out", f"{p}hf/{name}",
                     "--drop-negative-bias"]) == 0
  for name in set(spellings) - {"absolute"}:
    for output in ("runs/{}/expert", "merged/{}", "hf/{}"):
      ref, got = work / output.format("absolute"), work / output.format(name)
      _same_tree(ref, got)
      if (ref / store.MANIFEST).exists():
        assert _manifest(got) == _manifest(ref), (name, output)
    assert (work / "eval" / f"{name}.json").read_text() == \
        (work / "eval" / "absolute.json").read_text(), name
