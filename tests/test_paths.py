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

from flexolmo_jax import cli, paths, sharding
from flexolmo_jax.checkpoint import store
from flexolmo_jax.convert import hf
from tests.artifacts import owner_data
from tests.helpers import save_random_public

def test_absolute_resolves_every_spelling(tmp_path, monkeypatch):
  real = tmp_path / "work"
  (real / "sub").mkdir(parents=True)
  os.symlink(real, tmp_path / "link")
  monkeypatch.setenv("HOME", str(real))
  monkeypatch.chdir(real / "sub")
  want = str(real / "runs" / "x")
  for spelling in ("../runs/x", "../runs/x/", "./../runs/x", "~/runs/x", "~/runs/x/",
                   str(tmp_path / "link" / "runs" / "x"), want + "/", "../sub/../runs//x"):
    assert paths.absolute(spelling) == want, spelling
  assert paths.absolute("gs://bucket/run/") == "gs://bucket/run/"
  assert paths.absolute_named("code=../runs/x") == f"code={want}"
  assert paths.absolute_named("code") == "code"


def test_inside_refuses_paths_that_leave_their_directory(tmp_path):
  assert paths.inside(str(tmp_path), "a/b", "card") == str(tmp_path / "a" / "b")
  for bad in ("../x", "a/../../x", "/etc/hostname"):
    with pytest.raises(ValueError, match="card"):
      paths.inside(str(tmp_path), bad, "card")


def test_cli_makes_every_path_flag_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  args = cli.build_parser().parse_args(
      ["eval", "--model", "m/", "--data", "code=c.jsonl", "--data", "math", "--flexmix", "fm",
       "--json", "out.json"])
  cli.absolute_paths(args)
  assert args.model == str(tmp_path / "m") and args.json == str(tmp_path / "out.json")
  assert args.data == [f"code={tmp_path / 'c.jsonl'}", "math"]
  assert args.flexmix == str(tmp_path / "fm") and args.data_dir == str(tmp_path / "data/eval")
  args = cli.build_parser().parse_args(["pretrain", "--model", "tiny", "--data", "p.jsonl",
                                        "--out", "runs/p", "--eval-data", "code=../c.jsonl"])
  cli.absolute_paths(args)
  assert args.model == "tiny"                                  # a preset name, not a path
  assert args.data == [str(tmp_path / "p.jsonl")] and args.out == str(tmp_path / "runs/p")
  assert args.eval_data == [f"code={tmp_path.parent / 'c.jsonl'}"]


def test_a_run_directory_stands_for_its_model(tmp_path):
  public, _, _ = save_random_public(tmp_path / "run" / "model")
  assert store.saved_dir(str(tmp_path / "run")) == public
  assert store.saved_dir(public + "/") == public
  (tmp_path / "tuned" / "merged").mkdir(parents=True)
  (tmp_path / "tuned" / "merged" / store.MANIFEST).write_text("{}")
  assert store.saved_dir(str(tmp_path / "tuned")) == str(tmp_path / "tuned" / "merged")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    store.saved_dir(str(tmp_path / "nowhere"))


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
