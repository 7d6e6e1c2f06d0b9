"""A demo work directory keeps the size and seed its stages were built with: a run that asks for
others is refused before any stage, instead of reusing models built otherwise."""
import dataclasses
import json

import pytest

from flexolmo_jax.demo import sizes
from tests.helpers import run_cli


def test_a_work_directory_is_claimed_by_its_first_run_and_refuses_other_settings(
    tmp_path, monkeypatch):
  workdir = tmp_path / "workdir"
  first = sizes.claim_workdir(str(workdir), "quick", 0)
  record = json.loads((workdir / sizes.SETTINGS_FILE).read_text())
  assert record == first == {"size": "quick", "seed": 0,
                             "config": dataclasses.asdict(sizes.SIZES["quick"])}
  assert sizes.claim_workdir(str(workdir), "quick", 0) == first      # the same run again
  with pytest.raises(ValueError) as bad:
    sizes.claim_workdir(str(workdir), "default", 0)
  message = str(bad.value)
  assert message.startswith(str(workdir / sizes.SETTINGS_FILE))
  assert "quick-size demo with seed 0; this run asks for default size with seed 0" in message
  assert "differing: size, config.pretrain_steps, config.expert_steps" in message
  assert "--fresh" in message
  with pytest.raises(ValueError, match=r"seed 1 \(differing: seed\)"):
    sizes.claim_workdir(str(workdir), "quick", 1)
  # A size whose settings changed since the directory was built (an edited sizes.py).
  monkeypatch.setitem(sizes.SIZES, "quick",
                      dataclasses.replace(sizes.SIZES["quick"], tune_interpolation=0.5))
  with pytest.raises(ValueError, match=r"\(differing: config\.tune_interpolation\)"):
    sizes.claim_workdir(str(workdir), "quick", 0)
  assert json.loads((workdir / sizes.SETTINGS_FILE).read_text()) == record   # never rewritten
  # A field the record holds and the size no longer has is named too.
  (workdir / sizes.SETTINGS_FILE).write_text(json.dumps(
      {**record, "config": {**record["config"], "retired_field": 1}}))
  monkeypatch.undo()
  with pytest.raises(ValueError, match=r"\(differing: config\.retired_field\)"):
    sizes.claim_workdir(str(workdir), "quick", 0)


def test_demo_refuses_a_quick_run_in_a_default_size_directory(tmp_path):
  """As a user types it: `flexolmo demo` built the directory, `flexolmo demo --quick` follows."""
  sizes.claim_workdir(str(tmp_path / "workdir"), "default", 0)
  run = run_cli(["demo", "--quick"], cwd=tmp_path, timeout=120)
  assert run.returncode != 0
  assert "holds a default-size demo" in run.stderr and "Traceback" not in run.stderr
  assert sorted(p.name for p in (tmp_path / "workdir").iterdir()) == [sizes.SETTINGS_FILE]
