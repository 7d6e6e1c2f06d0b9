"""launch/: the rendered SLURM script runs on this machine with srun replaced by the
local launcher; the JobSet parses and names the image, command and process count."""
import json
import os
import shlex
import signal
import subprocess
import time

import pytest
import yaml

from flexolmo_jax import cli, launch

LOCAL = os.path.join(launch.LAUNCH_DIR, "local", "multiprocess.sh")


def render(capsys, *argv):
  assert cli.main(["launch", *argv]) == 0
  return capsys.readouterr().out


def test_the_local_launcher_stops_every_process_when_one_fails(tmp_path):
  marker = tmp_path / "survivor"
  cmd = (f"{shlex.quote(LOCAL)} --ntasks=3 bash -c "
         f"'if [ $FLEXOLMO_PROCESS_ID = 1 ]; then exit 7; fi; sleep 30; touch {marker}'")
  proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=20)
  assert proc.returncode == 7 and not marker.exists()


def test_the_local_launcher_stopped_from_outside_stops_every_copy(tmp_path):
  started = tmp_path / "started"
  marker = tmp_path / "survivor"
  proc = subprocess.Popen([LOCAL, "--ntasks=2", "bash", "-c",
                           f"touch {started}-$FLEXOLMO_PROCESS_ID; sleep 30; touch {marker}"])
  deadline = time.monotonic() + 10
  while not all((tmp_path / f"started-{i}").exists() for i in range(2)):
    assert time.monotonic() < deadline
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=10) == 143
  time.sleep(0.5)
  assert not marker.exists()
  assert subprocess.run(["pgrep", "-f", f"touch {marker}"], capture_output=True).returncode == 1


def test_the_jobset_parses_and_names_image_command_and_processes(capsys):
  text = render(capsys, "k8s", "--run", "pretrain", "--nodes", "4", "--gpus-per-node", "8",
                "--image", "ghcr.io/acme/flexolmo:1.2", "--name", "public-7b", "--dry-run", "--",
                "--model", "olmo2_7b", "--out", "gs://bucket/public")
  jobset = yaml.safe_load(text)
  assert jobset["kind"] == "JobSet" and jobset["metadata"]["name"] == "public-7b"
  assert jobset["spec"]["network"]["enableDNSHostnames"] is True
  job = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]
  assert job["completionMode"] == "Indexed" and job["parallelism"] == job["completions"] == 4
  container = job["template"]["spec"]["containers"][0]
  assert container["image"] == "ghcr.io/acme/flexolmo:1.2"
  assert container["command"] == ["flexolmo", "pretrain", "--model", "olmo2_7b", "--out",
                                  "gs://bucket/public"]
  assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
  env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
  assert env["FLEXOLMO_NUM_PROCESSES"] == "4"
  assert env["FLEXOLMO_COORDINATOR"] == "public-7b-workers-0-0.public-7b:1234"
  assert "job-completion-index" in json.dumps(env["FLEXOLMO_PROCESS_ID"])


def test_xpk_commands_for_tpu_and_gpu(capsys):
  tpu = render(capsys, "xpk", "--run", "pretrain", "--tpu-type", "v5p-256", "--cluster", "c1",
               "--dry-run", "--", "--model", "olmo2_7b")
  argv = shlex.split(tpu)
  assert argv[:3] == ["xpk", "workload", "create"] and argv[argv.index("--tpu-type") + 1] == "v5p-256"
  assert argv[argv.index("--command") + 1] == "flexolmo pretrain --model olmo2_7b"
  gpu = shlex.split(render(capsys, "xpk", "--run", "pretrain", "--nodes", "2", "--dry-run"))
  command = gpu[gpu.index("--command") + 1]
  assert gpu[gpu.index("--num-nodes") + 1] == "2"
  assert "FLEXOLMO_NUM_PROCESSES=2" in command and "$JOB_COMPLETION_INDEX" in command


@pytest.mark.parametrize("argv, message", [
    (["slurm", "--run", "nonsense"], "--run 'nonsense' is not one of"),
    (["k8s", "--run", "pretrain", "--name", "Bad_Name"], "job name 'Bad_Name'"),
    (["slurm", "--run", "pretrain", "--", "--gin-file", "/nonexistent.gin"],
     "gin file '/nonexistent.gin' does not exist"),
    (["slurm", "--run", "pretrain", "--nodes", "0"], "argument --nodes: 0 is below 1"),
])
def test_bad_launches_are_refused_by_name(argv, message, capsys):
  assert cli.main(["launch", *argv, "--dry-run"] if "--" not in argv else
                  ["launch", *argv[:argv.index("--")], "--dry-run", *argv[argv.index("--"):]]) == 2
  assert message in capsys.readouterr().err


def test_a_template_placeholder_without_a_value_is_named():
  with pytest.raises(ValueError, match=r"job.sbatch: no value for placeholder\(s\) \['FOO'\]"):
    launch.fill("x {{FOO}} {{RUN}}", {"RUN": "pretrain"}, "job.sbatch")


def test_every_launchable_run_is_a_cli_command():
  import argparse

  sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
  assert set(launch.RUNS) <= set(sub.choices)
  # Every launchable run takes a multi-process launch: all processes work, or process 0 alone.
  assert cli.MULTI_PROCESS_COMMANDS | cli.LEADER_COMMANDS == set(launch.RUNS)
  assert not cli.MULTI_PROCESS_COMMANDS & cli.LEADER_COMMANDS
