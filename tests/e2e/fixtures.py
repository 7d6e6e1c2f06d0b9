"""Session fixtures: the quick demo, run once, and what the other tests take from it.

The library's heavier modules (TensorFlow and torch among them) are imported where a fixture
first needs them: pytest-xdist's controller loads this module (tests/e2e/conftest.py) and runs
no test.

``flexolmo demo --quick`` runs in its own process (one CPU device, as a user runs it). Its
FlexMix-mini, public model and per-domain experts then serve the training, merge, router-tuning
and baseline tests, so nothing is trained twice. One more code expert is trained here, in the
test process, because some tests need the trainer's in-memory result (the frozen tree it held).
"""
import functools
import json
import os
from unittest import mock

import jax
import pytest

from flexolmo_jax import sharding
from flexolmo_jax.config import MeshConfig
from flexolmo_jax.data import flexmix_mini

# The quick demo took 16 min alone on 2 cores and 20 min beside the other end-to-end tests.
DEMO_TIMEOUT_S = 2700
# `make test` compiles the suite's programs fast (TEST_XLA_FLAGS in the Makefile sets these two
# XLA options): its runs are a few steps long. Long runs (the demo's 1000 and 200 steps at quick
# size) are compiled as a user's are, with XLA's own defaults (xla/debug_options_flags.cc).
USER_COMPILE = {"xla_backend_optimization_level": 3, "xla_llvm_disable_expensive_passes": False}


def user_compile_env() -> dict:
  """The environment changes for a long-running process (``flexolmo demo``, the server under
  load): XLA's flags without the suite's fast-compile ones. Only for those: a process that runs
  each program a few times is faster with them (the whole suite measured both ways: 26:40 with
  every process at the fast options, 26:41 at XLA's defaults, 28:43 with every started process
  at the defaults and the tests' own at the fast ones)."""
  fast = tuple(f"--{option}" for option in USER_COMPILE)
  flags = os.environ.get("XLA_FLAGS", "").split()
  return {"XLA_FLAGS": " ".join(f for f in flags if not f.startswith(fast))}


# The marks of every module whose tests read the quick demo's artifacts: one pytest-xdist worker
# runs them all, so the demo runs once (tests/e2e/conftest.py); the first waits for the demo.
DEMO_READERS = [pytest.mark.xdist_group("demo"), pytest.mark.timeout(DEMO_TIMEOUT_S)]
TRAIN = dict(batch_size=8, seq_len=128, log_every=50, async_checkpoints=False, peak_tflops=1.0)
# The in-process code expert is for what only the trainer's in-memory result shows (the frozen
# tree it held, the merge of its pair): a few steps, compiled as the suite's short runs are.
CODE_EXPERT_STEPS = 20


# The tests that take the ~100k-entry OLMo-2-style tokenizer run on one pytest-xdist worker, so
# it is trained once (76 s on a loaded runner).
OLMO2_TOKENIZER_USERS = pytest.mark.xdist_group("olmo2_tokenizer")


@pytest.fixture(scope="session")
def olmo2_tokenizer(tmp_path_factory):
  """The tokenizer.json path of a byte-level BPE at OLMo-2's size, with its pre-tokenizer
  pattern and its special tokens at its ids, trained on the standard library's sources."""
  from tests import bpe

  return bpe.write_bpe(str(tmp_path_factory.mktemp("olmo2_tokenizer")),
                       bpe.OLMO2_TRAINED + len(bpe.OLMO2_SPECIALS),
                       bpe.stdlib_texts(96 << 20), olmo2=True)


def run_dir(tmp_path_factory, name):
  """A fresh directory, or with FLEXOLMO_TEST_RUNS set (local iteration only) a kept one that
  the next session resumes from instead of training again."""
  keep = os.environ.get("FLEXOLMO_TEST_RUNS")
  return os.path.join(keep, name) if keep else str(tmp_path_factory.mktemp(name))


def train_config(steps, **changes):
  from flexolmo_jax.train import loop

  return loop.TrainConfig(**{**TRAIN, **dict(steps=steps, warmup_steps=steps // 10,
                                             checkpoint_every=steps, learning_rate=3e-3),
                             **changes})


def last_eval(run: str) -> dict:
  """{domain: loss} of the last evaluation a training run logged (metrics.jsonl)."""
  losses = None
  with open(os.path.join(run, "metrics.jsonl")) as fh:
    for line in fh:
      record = json.loads(line)
      if record["kind"] == "eval":
        losses = record["loss"]
  assert losses is not None, f"{run} logged no evaluation"
  return losses


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
  """{"cwd", "workdir", "log" (its console output), "stderr", "card"}: ``flexolmo demo --quick``
  end to end, typed as a user types it: from a fresh directory, with the default relative
  work directory (``workdir``)."""
  cwd = run_dir(tmp_path_factory, "demo")
  os.makedirs(cwd, exist_ok=True)
  workdir = os.path.join(cwd, "workdir")
  log_path, err_path = os.path.join(cwd, "demo.log"), os.path.join(cwd, "demo.stderr")
  if not os.path.exists(os.path.join(workdir, "report.json")):
    from tests.helpers import run_cli

    run = run_cli(["demo", "--quick"], timeout=DEMO_TIMEOUT_S - 60, cwd=cwd,
                  env=user_compile_env())
    with open(log_path, "w") as fh:
      fh.write(run.stdout + run.stderr)
    with open(err_path, "w") as fh:
      fh.write(run.stderr)
    assert run.returncode == 0, (run.stdout + run.stderr)[-5000:]
  with open(log_path) as fh:
    log = fh.read()
  with open(err_path) as fh:
    stderr = fh.read()
  card = flexmix_mini.read_card(os.path.join(workdir, "flexmix_mini"))
  return {"cwd": cwd, "workdir": workdir, "log": log, "stderr": stderr, "card": card}


@pytest.fixture(scope="session")
def flexmix(demo_run):
  """{domain: its prepared dataset directory} of the demo's FlexMix-mini (quick size)."""
  return {d: info["dataset_dir"] for d, info in demo_run["card"]["domains"].items()}


@pytest.fixture(scope="session")
def public(demo_run):
  """The demo's public model: {"run", "model", "eval_losses" (its last evaluation)}."""
  run = os.path.join(demo_run["workdir"], "public")
  return {"run": run, "model": os.path.join(run, "model"), "eval_losses": last_eval(run)}


@pytest.fixture(scope="session")
def code_expert(flexmix, public, tmp_path_factory):
  """A code expert trained in this process: {"run", "artifact", "result" (the TrainResult)}.
  Its quality is not its point: the demo's own code expert is the trained one (``experts``).

  On one device, as `flexolmo train-expert` runs in the demo: on a loaded 2-core runner the first
  step of this run on the 8-fake-device mesh could stall in a collective until XLA aborted the
  suite. Training on a mesh is tested in test_sharding, test_loop and test_multihost."""
  from flexolmo_jax.flexolmo import expert

  run = run_dir(tmp_path_factory, "expert_code")
  one_device = functools.partial(sharding.make_mesh, devices=jax.devices()[:1])
  with mock.patch.object(sharding, "make_mesh", one_device):
    result, artifact = expert.train_expert(    # as the demo trains its owners (demo/sizes.py)
        public=public["run"], name="code", data=[flexmix["code"]], output_dir=str(run),
        train=train_config(CODE_EXPERT_STEPS, mesh=MeshConfig(data=1), router_lr_scale=0.0),
        expert=expert.ExpertConfig(router_init="classifier"))
  return {"run": str(run), "artifact": artifact, "result": result}


@pytest.fixture(scope="session")
def experts(demo_run):
  """{domain: artifact directory}: the demo's expert of every closed domain, each trained
  against the demo's public model in its own process."""
  return {name: os.path.join(demo_run["workdir"], "experts", name, "expert")
          for name in flexmix_mini.CLOSED_DOMAINS}


def validation(flexmix, domains=None, seq_len=128, batch_size=8):
  """{domain: its validation batches} of FlexMix-mini (byte vocabulary)."""
  from flexolmo_jax.data import tasks, vocabularies

  vocab = vocabularies.load("byte")
  return {d: list(tasks.eval_batches({d: [flexmix[d]]}, vocab, "unused", seq_len, batch_size)[d])
          for d in domains or flexmix}
