"""Multi-host start-up on JAX's own multi-controller runtime (``jax.distributed``).

One process runs per host (or per GPU); every process runs the same ``flexolmo`` command. Where
the processes come from is the scheduler's business (SLURM, Open MPI, a Kubernetes JobSet, TPU
VMs); this module only finds out which one this is and calls ``jax.distributed.initialize``
before JAX touches a device:

1. explicit flags ``--coordinator HOST:PORT --num-processes N --process-id I`` (all three);
2. else the same three from ``FLEXOLMO_COORDINATOR``, ``FLEXOLMO_NUM_PROCESSES`` and
   ``FLEXOLMO_PROCESS_ID`` (what launch/k8s and launch/local set);
3. else JAX's own cluster detection, when a scheduler that JAX knows says there are several
   processes: SLURM (``SLURM_NTASKS``), Open MPI (``OMPI_COMM_WORLD_SIZE``), Cloud TPU
   (``TPU_WORKER_HOSTNAMES`` naming several hosts);
4. else a single process: nothing is initialized.

Afterwards ``jax.process_index()`` and ``jax.process_count()`` say who is who. Process 0 alone
prints, writes manifests, metrics and reports (``is_leader``); every process takes part in
collectives and in Orbax's checkpoint writes.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Mapping

ENV = {"coordinator": "FLEXOLMO_COORDINATOR", "num_processes": "FLEXOLMO_NUM_PROCESSES",
       "process_id": "FLEXOLMO_PROCESS_ID"}


@dataclasses.dataclass(frozen=True)
class Topology:
  """Where this process sits. ``coordinator`` is None when JAX detects it from the scheduler."""

  source: str                 # "flags", "env", "slurm", "ompi", "tpu" or "single"
  num_processes: int = 1
  process_id: int = 0
  coordinator: str | None = None

  @property
  def multi_process(self) -> bool:
    return self.num_processes > 1


def _explicit(values: Mapping[str, object], source: str, where: str) -> Topology | None:
  given = {k: v for k, v in values.items() if v not in (None, "")}
  if not given:
    return None
  missing = [k for k in ENV if k not in given]
  if missing:
    names = [f"--{k.replace('_', '-')}" if source == "flags" else ENV[k] for k in missing]
    raise ValueError(f"Multi-process start-up from {where} needs all of coordinator, "
                     f"num_processes and process_id; missing {', '.join(names)}.")
  try:
    n, pid = int(given["num_processes"]), int(given["process_id"])
  except ValueError:
    raise ValueError(f"{where}: num_processes={given['num_processes']!r} and process_id="
                     f"{given['process_id']!r} must be integers.") from None
  coordinator = str(given["coordinator"])
  host, _, port = coordinator.rpartition(":")
  if not host or not port.isdigit():
    raise ValueError(f"{where}: coordinator {coordinator!r} must be HOST:PORT.")
  if n < 1 or not 0 <= pid < n:
    raise ValueError(f"{where}: process_id {pid} is not in [0, num_processes={n}).")
  return Topology(source, n, pid, coordinator)


def _int(environ: Mapping[str, str], key: str, default: int = 1) -> int:
  try:
    return int(environ.get(key, default))
  except ValueError:
    raise ValueError(f"Environment variable {key}={environ[key]!r} is not an integer.") from None


def detect(coordinator: str | None = None, num_processes: int | None = None,
           process_id: int | None = None, environ: Mapping[str, str] | None = None) -> Topology:
  """The topology of this process, by the precedence in the module docstring."""
  environ = os.environ if environ is None else environ
  flags = _explicit({"coordinator": coordinator, "num_processes": num_processes,
                     "process_id": process_id}, "flags", "the command line")
  if flags:
    return flags
  env = _explicit({k: environ.get(v) for k, v in ENV.items()}, "env", "FLEXOLMO_* variables")
  if env:
    return env
  if "SLURM_JOB_ID" in environ and _int(environ, "SLURM_NTASKS") > 1:
    return Topology("slurm", _int(environ, "SLURM_NTASKS"), _int(environ, "SLURM_PROCID", 0))
  if _int(environ, "OMPI_COMM_WORLD_SIZE") > 1:
    return Topology("ompi", _int(environ, "OMPI_COMM_WORLD_SIZE"),
                    _int(environ, "OMPI_COMM_WORLD_RANK", 0))
  hosts = [h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
  if len(hosts) > 1:
    return Topology("tpu", len(hosts), _int(environ, "TPU_WORKER_ID", 0))
  return Topology("single")


# XLA:CPU ends the whole process (SIGABRT) when device threads wait at a collective for the
# warning time plus the termination time without the others arriving. CI saw it once, in the
# first step of an 8-fake-device training on a 2-core runner: a host that stalls (a paused VM,
# swapping) for that long is slow, not deadlocked, and the abort lost the whole test session. A
# CPU run gets these longer waits unless XLA_FLAGS names them; a true deadlock still ends in an
# abort, with every thread's stack, after 11 minutes.
CPU_COLLECTIVE_PATIENCE = {"xla_cpu_collective_call_warn_stuck_timeout_seconds": 60,
                           "xla_cpu_collective_call_terminate_timeout_seconds": 600}


def patient_cpu_collectives(environ: dict | None = None) -> str:
  """Adds ``CPU_COLLECTIVE_PATIENCE`` to ``XLA_FLAGS`` (before JAX's backend starts) unless the
  user named either flag: XLA waits out the warning time before it starts counting towards the
  termination, so the two are only meaningful as a pair. Returns the new ``XLA_FLAGS``. Only the
  CPU backend reads these flags."""
  environ = os.environ if environ is None else environ
  flags = environ.get("XLA_FLAGS", "").split()
  named = {f.lstrip("-").split("=", 1)[0] for f in flags}
  if not named & set(CPU_COLLECTIVE_PATIENCE):
    flags += [f"--{k}={v}" for k, v in CPU_COLLECTIVE_PATIENCE.items()]
  environ["XLA_FLAGS"] = " ".join(flags)
  return environ["XLA_FLAGS"]


_STARTED: Topology | None = None


def initialize(topology: Topology, *, timeout_s: int = 300) -> Topology:
  """Starts JAX's distributed runtime for a multi-process topology (once; a no-op otherwise).

  On the CPU backend the collectives between processes need an implementation (gloo); it is
  chosen here, before the backend starts."""
  global _STARTED
  if not topology.multi_process or _STARTED is not None:
    return _STARTED or topology
  import jax

  try:   # only the CPU backend reads these
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # With asynchronous dispatch, a CPU process's device threads can sit in collectives of two
    # different programs and wait for each other for ever (seen with 8 fake devices in tests).
    jax.config.update("jax_cpu_enable_async_dispatch", False)
  except (AttributeError, ValueError):   # a JAX without the option
    pass
  kwargs = {"initialization_timeout": timeout_s}
  if topology.coordinator is not None:
    kwargs.update(coordinator_address=topology.coordinator,
                  num_processes=topology.num_processes, process_id=topology.process_id)
  jax.distributed.initialize(**kwargs)
  if jax.process_count() != topology.num_processes:
    raise RuntimeError(f"jax.distributed started {jax.process_count()} processes, "
                       f"{topology.source} said {topology.num_processes}.")
  _STARTED = topology
  return topology


def is_leader() -> bool:
  """Process 0: the one that prints, writes manifests, metrics and reports."""
  import jax

  return jax.process_index() == 0


def sync(name: str) -> None:
  """Every process waits here until all have arrived (no-op with one process)."""
  import jax

  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def agree_max(value: int) -> int:
  """The largest of every process's ``value`` (its own value with one process)."""
  import jax

  if jax.process_count() == 1:
    return int(value)
  import numpy as np
  from jax.experimental import multihost_utils

  return int(np.max(multihost_utils.process_allgather(np.int32(value))))


def broadcast_from_leader(value: int) -> int:
  """Process 0's ``value`` on every process."""
  import jax

  if jax.process_count() == 1:
    return int(value)
  import numpy as np
  from jax.experimental import multihost_utils

  return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def sum_across_processes(values) -> list[float]:
  """Each float64 of ``values`` summed over every process, in process order (the values
  themselves with one process). Exact: the float64s travel as their bytes, so a JAX without x64
  does not round them to float32 on the way."""
  import jax
  import numpy as np

  mine = np.asarray(values, np.float64)
  if jax.process_count() == 1:
    return [float(v) for v in mine]
  from jax.experimental import multihost_utils

  gathered = np.asarray(multihost_utils.process_allgather(mine.view(np.uint32)))
  parts = gathered.reshape(jax.process_count(), -1).view(np.float64)
  total = np.zeros_like(mine)
  for part in parts:
    total = total + part
  return [float(v) for v in total]

