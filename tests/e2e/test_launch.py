"""launch/: the rendered SLURM script runs on this machine with srun replaced by the
local launcher; the JobSet parses and names the image, command and process count."""
import os
import shlex
import subprocess
import sys
import time

import pytest
from flexolmo_jax import launch
from flexolmo_jax.checkpoint import store
from tests.test_loop import train_losses
from tests.e2e.test_resume import corpus
from tests.test_launch import render
LOCAL = os.path.join(launch.LAUNCH_DIR, "local", "multiprocess.sh")


@pytest.mark.slow
def test_the_slurm_script_runs_two_processes_with_the_local_launcher(tmp_path, capsys):
  data = tmp_path / "public.jsonl"
  corpus(data)
  gin_file = tmp_path / "experiment.gin"
  gin_file.write_text("STEPS = 3\nBATCH_SIZE = 8\nSEQ_LEN = 64\nWARMUP_STEPS = 1\n"
                      "flexolmo.TrainConfig.peak_tflops = 1.0\n"
                      "flexolmo.pretrain.embedding_documents = 8\n")
  script = render(capsys, "slurm", "--run", "pretrain", "--nodes", "2", "--workdir", str(tmp_path),
                  "--executable", f"{sys.executable} -m flexolmo_jax.cli", "--dry-run", "--",
                  "--gin-file", str(gin_file), "--data", str(data), "--out", str(tmp_path / "run"),
                  "--log-every", "1")
  assert "#SBATCH --nodes=2" in script and "srun --ntasks=2 " in script
  local = script.replace("srun ", f"{shlex.quote(LOCAL)} ")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_CPU_ENABLE_ASYNC_DISPATCH": "false",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  proc = subprocess.run(["bash", "-c", local], env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  # One run of 2 processes x 2 devices: process 0 logged 3 steps, the model was published once.
  assert sorted(train_losses(tmp_path / "run")) == [1, 2, 3]
  assert proc.stderr.count("[train 3/3]") == 1
  manifest = store.read_manifest(tmp_path / "run" / "model", "public")
  assert manifest["data_card"]["train_config"]["batch_size"] == 8
  assert not [p for p in os.listdir(tmp_path / "run") if ".partial-" in p]


# Five rounds, each waiting out a 1 s kill grace: a multi-process test, so it lives here.
def test_the_local_launcher_stops_copies_that_fail_at_once_or_ignore_sigterm(tmp_path):
  # Copy 1 fails before the others have started (it once left them sleeping: they had not yet
  # made their process groups); copy 2 ignores SIGTERM and is killed after the grace period.
  marker = tmp_path / "survivor"
  script = tmp_path / "copy.sh"
  script.write_text(f"""
if [ $FLEXOLMO_PROCESS_ID = 1 ]; then exit 5; fi
if [ $FLEXOLMO_PROCESS_ID = 2 ]; then trap '' TERM; fi
sleep 30 & wait $!; sleep 30; touch {marker}
""")
  env = {**os.environ, "FLEXOLMO_KILL_GRACE": "1"}
  for _ in range(5):
    start = time.monotonic()
    proc = subprocess.run([LOCAL, "--ntasks=3", "bash", str(script)], env=env,
                          capture_output=True, text=True, timeout=25)
    assert proc.returncode == 5 and not marker.exists()
    assert time.monotonic() - start < 15
