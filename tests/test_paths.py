"""Every spelling of a path gives the same result: relative, ``./``, ``../``, ``~``, trailing
slashes and symlinked directories, against absolute paths; run directories stand for their model;
records read by later commands do not depend on the directory they were written from."""
import os

import pytest

from flexolmo_jax import cli, paths
from flexolmo_jax.checkpoint import store
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
