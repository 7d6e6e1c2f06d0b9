"""Session fixtures on FlexMix-mini (quick size): the public model and one expert per domain.

Shared by the training, merge, router-tuning and baseline tests, so each is trained once.
"""
import json
import os

import pytest

from flexolmo_jax import cli
from flexolmo_jax.data import flexmix_mini, tasks
from flexolmo_jax.train import expert, loop, pretrain
from tests.helpers import tiny

TRAIN = dict(batch_size=8, seq_len=128, log_every=50, async_checkpoints=False, peak_tflops=1.0)
EXPERT_STEPS = {"code": 300, "prose": 150, "legal": 150, "math": 150}


def run_dir(tmp_path_factory, name):
  """A fresh directory, or with FLEXOLMO_TEST_RUNS set (local iteration only) a kept one that
  the next session resumes from its final checkpoint instead of training again."""
  keep = os.environ.get("FLEXOLMO_TEST_RUNS")
  return os.path.join(keep, name) if keep else str(tmp_path_factory.mktemp(name))


def train_config(steps, **changes):
  return loop.TrainConfig(**{**TRAIN, **dict(steps=steps, warmup_steps=steps // 10,
                                             checkpoint_every=steps, learning_rate=3e-3),
                             **changes})


@pytest.fixture(scope="session")
def flexmix(tmp_path_factory):
  out = run_dir(tmp_path_factory, "flexmix")
  card_path = os.path.join(out, "flexmix_mini.json")
  if os.path.exists(card_path):        # only with FLEXOLMO_TEST_RUNS
    with open(card_path) as fh:
      card = json.load(fh)
  else:
    card = flexmix_mini.build(out, "quick")
  # The prepared datasets: FlexMix-mini's own split (at least 2 validation documents a domain).
  return {d: info["dataset_dir"] for d, info in card["domains"].items()}


@pytest.fixture(scope="session")
def public(flexmix, tmp_path_factory):
  run = run_dir(tmp_path_factory, "public")
  result, model_dir = pretrain.pretrain(
      output_dir=str(run), data=[flexmix["public"]], eval_data={"code": [flexmix["code"]]},
      train=train_config(300), model=tiny())
  return {"run": str(run), "model": model_dir, "result": result}


def _train_expert(name, flexmix, public, tmp_path_factory):
  run = run_dir(tmp_path_factory, f"expert_{name}")
  result, artifact = expert.train_expert(public=public["run"], name=name, data=[flexmix[name]],
                                         output_dir=str(run), train=train_config(EXPERT_STEPS[name]))
  return {"run": str(run), "artifact": artifact, "result": result}


@pytest.fixture(scope="session")
def code_expert(flexmix, public, tmp_path_factory):
  return _train_expert("code", flexmix, public, tmp_path_factory)


@pytest.fixture(scope="session")
def experts(flexmix, public, code_expert, tmp_path_factory):
  """{domain: artifact directory} for every closed FlexMix-mini domain."""
  out = {"code": code_expert["artifact"]}
  for name in flexmix_mini.CLOSED_DOMAINS:
    if name not in out:
      out[name] = _train_expert(name, flexmix, public, tmp_path_factory)["artifact"]
  return out


def validation(flexmix, domains=None, seq_len=128, batch_size=8):
  """{domain: its validation batches} of FlexMix-mini (byte vocabulary)."""
  vocab = tasks.vocabulary_from_spec("byte")
  return {d: list(cli.eval_batches({d: [flexmix[d]]}, vocab, "unused", seq_len, batch_size)[d])
          for d in domains or flexmix}
