"""Exact resume after kill -9: the CLI run is killed mid-training and re-run with the same command."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from flexolmo_jax.train import checkpoints
from tests.test_loop import train_losses

STEPS = 200


def corpus(path):
  """Real text on every machine: paragraphs of the standard library's os.py."""
  text = open(os.__file__, encoding="utf-8").read()
  with open(path, "w") as fh:
    for i, para in enumerate(p for p in text.split("\n\n") if p.strip()):
      fh.write(json.dumps({"text": para, "id": i}) + "\n")


def command(data, out):
  return [sys.executable, "-m", "flexolmo_jax.cli", "pretrain", "--data", str(data),
          "--out", str(out), "--steps", str(STEPS), "--batch-size", "4", "--seq-len", "64",
          "--log-every", "1", "--checkpoint-every", "20", "--warmup", "10",
          "--gin.flexolmo.TrainConfig.peak_tflops=1.0", "--gin.flexolmo.pretrain.embedding_documents=8"]


def run(cmd, **kwargs):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          **kwargs)


@pytest.mark.slow
def test_kill_9_then_rerun_gives_the_losses_of_an_uninterrupted_run(tmp_path):
  data = tmp_path / "public.jsonl"
  corpus(data)
  reference = run(command(data, tmp_path / "ref"))
  victim = run(command(data, tmp_path / "run"))
  ckpts = tmp_path / "run" / "checkpoints"
  deadline = time.time() + 600
  while time.time() < deadline and victim.poll() is None:
    done = [int(s) for s in os.listdir(ckpts) if checkpoints.is_complete(ckpts / s)] if ckpts.exists() else []
    if done and max(done) >= 60:
      break
    time.sleep(0.05)
  assert victim.poll() is None, "the run finished before it could be killed: raise STEPS"
  os.kill(victim.pid, signal.SIGKILL)
  victim.wait()
  killed_at = max(int(s) for s in os.listdir(ckpts) if checkpoints.is_complete(ckpts / s))
  assert killed_at < STEPS
  out, err = reference.communicate(timeout=600)
  assert reference.returncode == 0, err[-3000:]
  again = run(command(data, tmp_path / "run"))
  out, err = again.communicate(timeout=600)
  assert again.returncode == 0, err[-3000:]
  assert f"from=checkpoint {killed_at}" in err or f"checkpoint {killed_at}" in err
  resumed, uninterrupted = train_losses(tmp_path / "run"), train_losses(tmp_path / "ref")
  assert sorted(resumed) == list(range(1, STEPS + 1))
  assert resumed == uninterrupted     # every step's loss, bit for bit (JSON floats)
  assert os.path.exists(tmp_path / "run" / "model" / "manifest.json")


@pytest.mark.slow
def test_sigterm_saves_and_exits_143(tmp_path):
  data = tmp_path / "public.jsonl"
  corpus(data)
  proc = run(command(data, tmp_path / "run"))
  metrics = tmp_path / "run" / "metrics.jsonl"
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and sum(1 for _ in open(metrics)) >= 5:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 143, err[-3000:]
  saved = [int(s) for s in os.listdir(tmp_path / "run" / "checkpoints")
           if checkpoints.is_complete(tmp_path / "run" / "checkpoints" / s)]
  match = re.search(r"\[preempted (\d+)/\d+\] saved=checkpoint (\d+)", err)
  assert match and match.group(1) == match.group(2), err[-2000:]
  step = int(match.group(1))
  assert 5 <= step < STEPS and max(saved) == step     # saved where it stopped, not at a multiple
  assert not os.path.exists(tmp_path / "run" / "model")   # an unfinished run exports nothing
