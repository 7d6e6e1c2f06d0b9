"""Each training flag is declared once: it sets a gin macro that its run's gin file declares."""
import os
import re

import pytest

from flexolmo_jax.cli import run_config
from flexolmo_jax.config import GIN_DIR


def macros(run: str) -> set[str]:
  """The macros ``runs/<run>.gin`` declares, with those of the files it includes."""
  with open(os.path.join(GIN_DIR, "runs", f"{run}.gin")) as fh:
    text = fh.read()
  found = set(re.findall(r"^([A-Z][A-Z0-9_]*)\s*=", text, re.M))
  for included in re.findall(r"^include 'runs/(\w+)\.gin'", text, re.M):
    found |= macros(included)
  return found


@pytest.mark.parametrize("run, flags", [("pretrain", run_config.PRETRAIN_FLAGS),
                                        ("train_expert", run_config.EXPERT_FLAGS),
                                        ("train_dense", run_config.DENSE_FLAGS),
                                        ("tune_router", run_config.TUNE_FLAGS)])
def test_every_flag_sets_a_macro_its_gin_file_declares(run, flags):
  missing = sorted(f"--{dest.replace('_', '-')} -> {macro}" for dest, macro in flags.items()
                   if macro not in macros(run))
  assert not missing, f"runs/{run}.gin declares no macro for {missing}"


def test_the_check_sees_a_missing_macro():
  assert "NOT_A_MACRO" not in macros("pretrain") and "STEPS" in macros("train_dense")
