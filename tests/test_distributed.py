"""Multi-host start-up: which topology each scheduler's environment gives, and bad input refused."""
import pytest

from flexolmo_jax import cli, distributed
from flexolmo_jax.distributed import Topology


@pytest.mark.parametrize("environ, expected", [
    ({}, Topology("single")),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, Topology("single")),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_PROCID": "2"}, Topology("slurm", 4, 2)),
    ({"OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_RANK": "5"}, Topology("ompi", 8, 5)),
    ({"TPU_WORKER_HOSTNAMES": "t0,t1", "TPU_WORKER_ID": "1"}, Topology("tpu", 2, 1)),
    ({"TPU_WORKER_HOSTNAMES": "t0", "TPU_WORKER_ID": "0"}, Topology("single")),
    # The FLEXOLMO_* variables (launch/k8s, launch/local) win over a scheduler's.
    ({"FLEXOLMO_COORDINATOR": "head:1234", "FLEXOLMO_NUM_PROCESSES": "2",
      "FLEXOLMO_PROCESS_ID": "1", "SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"},
     Topology("env", 2, 1, "head:1234")),
])
def test_detect_reads_each_schedulers_environment(environ, expected):
  assert distributed.detect(environ=environ) == expected


def test_flags_win_over_the_environment():
  environ = {"FLEXOLMO_COORDINATOR": "a:1", "FLEXOLMO_NUM_PROCESSES": "4",
             "FLEXOLMO_PROCESS_ID": "3"}
  assert (distributed.detect("b:2", 2, 0, environ=environ) == Topology("flags", 2, 0, "b:2"))


@pytest.mark.parametrize("kwargs, environ, message", [
    ({"coordinator": "h:1", "num_processes": 2}, {}, "missing --process-id"),
    ({}, {"FLEXOLMO_COORDINATOR": "h:1"}, "missing FLEXOLMO_NUM_PROCESSES, FLEXOLMO_PROCESS_ID"),
    ({"coordinator": "h", "num_processes": 2, "process_id": 0}, {}, "must be HOST:PORT"),
    ({"coordinator": "h:1", "num_processes": 2, "process_id": 2}, {}, "not in [0, num_processes=2)"),
    ({"coordinator": "h:1", "num_processes": "two", "process_id": 0}, {}, "must be integers"),
    ({}, {"SLURM_JOB_ID": "1", "SLURM_NTASKS": "many"}, "SLURM_NTASKS='many' is not an integer"),
])
def test_bad_topologies_are_refused_by_name(kwargs, environ, message):
  with pytest.raises(ValueError) as e:
    distributed.detect(**kwargs, environ=environ)
  assert message in str(e.value)


def test_single_process_initializes_nothing():
  assert distributed.initialize(Topology("single")) == Topology("single")


def test_distributed_flags_are_taken_from_anywhere_on_the_command_line():
  rest, found = cli.split_distributed_flags(
      ["--coordinator", "h:9", "eval", "--num-processes=2", "--model", "m", "--process-id", "1"])
  assert rest == ["eval", "--model", "m"]
  assert found == {"coordinator": "h:9", "num_processes": "2", "process_id": "1"}
  with pytest.raises(ValueError, match="--process-id needs a value"):
    cli.split_distributed_flags(["eval", "--process-id"])


def test_commands_not_yet_multi_host_safe_refuse_a_multi_process_start(capsys):
  code = cli.main(["demo", "--coordinator", "h:1", "--num-processes", "2", "--process-id", "0"])
  err = capsys.readouterr().err
  assert code == 2 and "`flexolmo demo` runs as one process for now (flags asked for 2)" in err


def test_host_side_work_is_done_by_process_0_alone(tmp_path, capsys):
  """merge, btx, export-hf and import-hf in a multi-process launch: every process but 0 exits at
  once (status 0, saying so, touching nothing); process 0 works as a single process (tested
  bit-identical to a plain merge in test_merge.py)."""
  out = tmp_path / "merged"
  code = cli.main(["merge", "--public", str(tmp_path / "absent"), "--expert", "x", "--out",
                   str(out), "--coordinator", "h:1", "--num-processes", "2", "--process-id", "1"])
  assert code == 0 and not out.exists()
  assert ("flexolmo merge: process 1 of 2 (flags) has nothing to do: process 0 does this "
          "host-side work alone.") in capsys.readouterr().out
  # Process 0 of the same launch starts no runtime and does the work (here: refuses the absent
  # public model by name, as a single process would).
  code = cli.main(["merge", "--public", str(tmp_path / "absent"), "--expert", "x", "--out",
                   str(out), "--coordinator", "h:1", "--num-processes", "2", "--process-id", "0"])
  assert code == 2 and str(tmp_path / "absent") in capsys.readouterr().err


def test_cpu_collective_patience_is_added_unless_the_user_set_it():
  environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 "
                          "--xla_cpu_collective_call_terminate_timeout_seconds=7"}
  assert distributed.patient_cpu_collectives(environ) == environ["XLA_FLAGS"] == (
      "--xla_force_host_platform_device_count=8 "
      "--xla_cpu_collective_call_terminate_timeout_seconds=7")
  assert distributed.patient_cpu_collectives({}) == (
      "--xla_cpu_collective_call_warn_stuck_timeout_seconds=60 "
      "--xla_cpu_collective_call_terminate_timeout_seconds=600")
