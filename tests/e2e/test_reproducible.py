"""Two runs with the same seed give the same numbers, wherever their data and work directories
are: the public model, an owner's expert (classifier router init, so the token statistics are
covered too), the merge and its evaluation, bit for bit."""
import functools
import os

import jax
import numpy as np
import pytest

from flexolmo_jax import cli, sharding
from flexolmo_jax.checkpoint import store
from tests.artifacts import owner_data


def _run(where, monkeypatch) -> dict:
  """The story in ``where`` with relative paths; returns what must not depend on ``where``."""
  where.mkdir(parents=True)
  monkeypatch.chdir(where)
  owner_data(where / "public.jsonl", seed=1, documents=80)
  owner_data(where / "code.jsonl", seed=2, documents=80)
  common = ["--batch-size", "4", "--seq-len", "64", "--log-every", "1", "--seed", "3",
            "--warmup", "1"]
  one_device = functools.partial(sharding.make_mesh, devices=jax.devices()[:1])
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(sharding, "make_mesh", one_device)
    assert cli.main(["pretrain", "--model", "tiny", "--data", "public.jsonl", "--out",
                     "runs/public", "--steps", "6", *common]) == 0
    assert cli.main(["train-expert", "--public", "runs/public", "--name", "code", "--data",
                     "code.jsonl", "--out", "runs/code", "--steps", "4",
                     "--router-init", "classifier", *common]) == 0
  assert cli.main(["merge", "--public", "runs/public", "--expert", "runs/code",
                   "--out", "runs/merged"]) == 0
  assert cli.main(["eval", "--model", "runs/merged", "--data", "code=code.jsonl",
                   "--data", "public=public.jsonl", "--seq-len", "64", "--batch-size", "4",
                   "--json", "eval.json"]) == 0
  losses = {run: [line for line in (where / "runs" / run / "metrics.jsonl").read_text().splitlines()
                  if '"loss"' in line] for run in ("public", "code")}
  return {"public": store.load_params(str(where / "runs/public/model")),
          "expert": store.load_params(str(where / "runs/code/expert")),
          "losses": {run: [_without_speed(line) for line in lines] for run, lines in losses.items()},
          "eval": (where / "eval.json").read_text()}


def _without_speed(line: str) -> dict:
  import json

  record = json.loads(line)
  return {k: v for k, v in record.items()
          if not any(w in k for w in ("tokens_per_s", "mfu", "compile", "seconds", "time"))}


@pytest.mark.slow
def test_two_runs_in_different_directories_give_identical_models_and_numbers(
    tmp_path, monkeypatch):
  first = _run(tmp_path / "a", monkeypatch)
  second = _run(tmp_path / "elsewhere" / "deeper" / "b", monkeypatch)
  assert first["losses"] == second["losses"]
  steps = {run: sum(r["kind"] == "train" for r in records)
           for run, records in first["losses"].items()}
  assert steps == {"public": 6, "code": 4}
  for what in ("public", "expert"):
    for path, leaf in store.flatten(first[what]).items():
      np.testing.assert_array_equal(np.asarray(store.flatten(second[what])[path]),
                                    np.asarray(leaf), err_msg=f"{what}: {path}")
  assert first["eval"] == second["eval"]
