"""Multi-host training (issue #8): two processes on localhost, each with 4 CPU devices and
``jax.distributed.initialize``, against one process with 8 devices reading the same shards."""
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from flexolmo_jax.checkpoint import store
from tests.test_loop import train_losses
from tests.test_resume import corpus

STEPS = 5
TIMEOUT_S = 300


def command(data, out, steps, *extra, run=("pretrain", "--model", "tiny")):
  return [sys.executable, "-m", "flexolmo_jax.cli", *run,
          "--data", str(data), "--out", str(out), "--steps", str(steps), "--batch-size", "8",
          "--seq-len", "64", "--log-every", "1", "--checkpoint-every", str(STEPS), "--warmup", "2",
          "--gin.flexolmo.TrainConfig.peak_tflops=1.0",
          "--gin.flexolmo.TrainConfig.data_shards=2",
          *(["--gin.flexolmo.pretrain.embedding_documents=8"] if run[0] == "pretrain" else []),
          *extra]


def distributed_flags(port, i):
  return ["--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)]


def env(devices):
  return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_CPU_ENABLE_ASYNC_DISPATCH": "false",
          "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run_all(commands, devices):
  """Starts every command, waits for all (bounded), kills what is left; returns their outputs."""
  procs = [subprocess.Popen(c, env=env(devices), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for c in commands]
  try:
    outs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  return outs


@pytest.mark.slow
def test_two_processes_train_like_one_and_their_checkpoint_restores_in_one(tmp_path):
  data = tmp_path / "public.jsonl"
  corpus(data)
  single, multi = tmp_path / "single", tmp_path / "multi"
  port = free_port()
  run_all([command(data, single, STEPS)], devices=8)
  outs = run_all([command(data, multi, STEPS, *distributed_flags(port, i)) for i in range(2)],
                 devices=4)
  # Both processes ran as one 8-device program; process 0 alone logs (and writes metrics).
  assert f"[train {STEPS}/{STEPS}]" in outs[0] and "[train" not in outs[1]
  one, two = train_losses(single), train_losses(multi)
  assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(one)],
                             rtol=2e-6, atol=0)
  assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]
  # The multi-host model restores in this single process: its recorded fingerprint is the one
  # of the bytes on disk, and it equals the single-process model's up to float reassociation.
  mine = store.load_params(single / "model")
  theirs = store.load_params(multi / "model")
  manifest = store.read_manifest(multi / "model", "public")
  assert manifest["fingerprint"] == store.fingerprint(theirs)
  for path, leaf in store.flatten(mine).items():
    np.testing.assert_allclose(store.flatten(theirs)[path], leaf, rtol=1e-5, atol=1e-6,
                               err_msg=path)
  with open(multi / "metrics.jsonl") as fh:
    assert all(json.loads(line)["step"] <= STEPS for line in fh)
  # Its training checkpoint resumes in one process, on another host count (the stream is the
  # same 2 shards): step 6 there equals step 6 of the single-process run resumed the same way.
  shutil.rmtree(multi / "model")
  shutil.rmtree(single / "model")
  run_all([command(data, single, STEPS + 1), command(data, multi, STEPS + 1)], devices=8)
  one, two = train_losses(single), train_losses(multi)
  np.testing.assert_allclose(two[STEPS + 1], one[STEPS + 1], rtol=2e-6, atol=0)


@pytest.mark.slow
def test_two_processes_train_an_expert_and_a_dense_model_like_one(tmp_path):
  """An owner's expert (and a dense continuation) on 2 hosts: the same losses and artifact as on
  one host of 8 devices."""
  data = tmp_path / "public.jsonl"
  corpus(data)
  run_all([command(data, tmp_path / "public", 2)], devices=1)
  expert = ("train-expert", "--public", str(tmp_path / "public"), "--name", "owner",
            "--gin.ROUTER_INIT_DOCUMENTS=8")
  single, multi = tmp_path / "single", tmp_path / "multi"
  run_all([command(data, single, STEPS, run=expert)], devices=8)
  port = free_port()
  run_all([command(data, multi, STEPS, *distributed_flags(port, i), run=expert)
           for i in range(2)], devices=4)
  one, two = train_losses(single), train_losses(multi)
  np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(one)],
                             rtol=2e-6, atol=0)
  mine, theirs = (store.read_manifest(d / "expert", "expert") for d in (single, multi))
  assert theirs["anchor_fingerprint"] == mine["anchor_fingerprint"]
  assert theirs["public_router_fingerprint"] == mine["public_router_fingerprint"]
  assert os.path.exists(multi / "expert" / "domain_embedding.npz")
  a, b = store.load_params(single / "expert"), store.load_params(multi / "expert")
  for path, leaf in store.flatten(a).items():
    np.testing.assert_allclose(store.flatten(b)[path], leaf, rtol=1e-5, atol=1e-6, err_msg=path)
  # The baselines' dense model (the public model continued on the owner's data) likewise.
  dense = ("train-dense", "--public", str(tmp_path / "public"), "--name", "owner")
  run_all([command(data, tmp_path / "dense1", STEPS, run=dense)], devices=8)
  port = free_port()
  run_all([command(data, tmp_path / "dense2", STEPS, *distributed_flags(port, i), run=dense)
           for i in range(2)], devices=4)
  one, two = train_losses(tmp_path / "dense1"), train_losses(tmp_path / "dense2")
  np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(one)],
                             rtol=2e-6, atol=0)
  assert (store.read_manifest(tmp_path / "dense2" / "model", "dense")["anchor_fingerprint"]
          == mine["anchor_fingerprint"])
  # Router tuning of the merged model, with expert dropout: the same losses and router rows.
  from flexolmo_jax.checkpoint import merge

  merge.merge(str(tmp_path / "public"), [str(single / "expert")], str(tmp_path / "merged"))
  tune = ("tune-router", "--merged", str(tmp_path / "merged"), "--expert-dropout", "0.5")
  run_all([command(data, tmp_path / "tune1", STEPS, run=tune)], devices=8)
  port = free_port()
  run_all([command(data, tmp_path / "tune2", STEPS, *distributed_flags(port, i), run=tune)
           for i in range(2)], devices=4)
  one, two = train_losses(tmp_path / "tune1"), train_losses(tmp_path / "tune2")
  np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(one)],
                             rtol=2e-6, atol=0)
  rows1, rows2 = (merge.read_router(str(tmp_path / d / "merged")) for d in ("tune1", "tune2"))
  assert sorted(rows1) == sorted(rows2)
  for key in rows1:
    np.testing.assert_allclose(rows2[key], rows1[key], rtol=1e-5, atol=1e-6, err_msg=key)
