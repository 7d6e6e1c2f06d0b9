"""``flexolmo launch ENGINE --run RUN``: one run of the CLI, filled into a ``launch/`` template.

The engines are the schedulers people already have; flexolmo_jax only writes their job file and
lets JAX's multi-controller runtime (``distributed.py``) find its processes:

- ``slurm``: ``launch/slurm/job.sbatch``, ``srun`` one process per node or per GPU;
- ``k8s``: ``launch/k8s/jobset.yaml``, an Indexed Job in a JobSet (headless service for pod 0);
- ``xpk``: the ``xpk workload create`` command line (TPU slices or GPU node pools on GKE);
- ``local``: ``launch/local/multiprocess.sh``, N processes on this machine.

``--dry-run`` prints what would be submitted; otherwise the job file is written next to the
current directory and handed to ``sbatch`` / ``kubectl apply`` / ``xpk`` (or run, for local).
Every run takes any number of processes: the training runs and ``eval`` use them all
(``cli.MULTI_PROCESS_COMMANDS``); the one-host work (``cli.LEADER_COMMANDS``: merge, btx,
export-hf, import-hf, generate) is done by process 0 while the others exit at once.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
from typing import Sequence

LAUNCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch")
ENGINES = ("slurm", "k8s", "xpk", "local")
RUNS = ("pretrain", "train-expert", "train-dense", "tune-router", "merge", "btx", "eval", "generate",
        "extraction", "export-hf", "import-hf", "lm-eval")
TEMPLATES = {"slurm": "slurm/job.sbatch", "k8s": "k8s/jobset.yaml"}
SUFFIX = {"slurm": ".sbatch", "k8s": ".yaml"}
SUBMIT = {"slurm": ["sbatch"], "k8s": ["kubectl", "apply", "-f"]}
_PLACEHOLDER = re.compile(r"\{\{([A-Z_]+)\}\}")
# Values pasted into job files (a SLURM script is shell, a JobSet is YAML) match these or are
# refused: a newline or quote in a flag must never become a command or a pod setting.
VALUE_PATTERNS = {
    "time": r"(\d+-)?\d+(:\d+){0,2}|UNLIMITED",          # SLURM's time formats
    "partition": r"[A-Za-z0-9_.,-]*",
    "image": r"[A-Za-z0-9][A-Za-z0-9._/:@+-]*",
    "service_account": r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?",  # a Kubernetes name
    "cluster": r"[A-Za-z0-9_-]+",
    "tpu_type": r"[a-z0-9-]*",
    "device_type": r"[a-z0-9-]+",
}


@dataclasses.dataclass(frozen=True)
class Job:
  engine: str
  run: str
  run_args: tuple[str, ...] = ()   # the run's own flags, --gin-file included
  nodes: int = 1
  procs_per_node: int = 1
  gpus_per_node: int = 0
  name: str = ""
  image: str = "flexolmo-jax:latest"
  executable: str = "flexolmo"
  time: str = "24:00:00"
  partition: str = ""
  workdir: str = "."
  service_account: str = "default"
  cluster: str = "CLUSTER"
  tpu_type: str = ""                # xpk on TPU: e.g. v5p-256 (then the slice sets the processes)
  device_type: str = "h100-80gb-8"  # xpk on GPU

  def __post_init__(self):
    if self.engine not in ENGINES:
      raise ValueError(f"launch: engine {self.engine!r} is not one of {ENGINES}.")
    if self.run not in RUNS:
      raise ValueError(f"launch: --run {self.run!r} is not one of {RUNS}.")
    for field in ("nodes", "procs_per_node"):
      if getattr(self, field) < 1:
        raise ValueError(f"launch: --{field.replace('_', '-')}={getattr(self, field)} must be >= 1.")
    if self.gpus_per_node < 0:
      raise ValueError(f"launch: --gpus-per-node={self.gpus_per_node} must be >= 0.")
    for field, pattern in VALUE_PATTERNS.items():
      value = getattr(self, field)
      if not isinstance(value, str) or not re.fullmatch(pattern, value):
        raise ValueError(f"launch: --{field.replace('_', '-')} {value!r} is not a valid value "
                         f"(it must match {pattern}).")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", self.job_name):
      raise ValueError(f"launch: job name {self.job_name!r}: use lower-case letters, digits and "
                       "'-' (Kubernetes names).")
    for i, arg in enumerate(self.run_args):
      if arg == "--gin-file" or arg.startswith("--gin-file="):
        path = arg.partition("=")[2] or (self.run_args[i + 1] if i + 1 < len(self.run_args) else "")
        if not os.path.isfile(path):
          raise FileNotFoundError(f"launch: gin file {path!r} does not exist.")

  @property
  def processes(self) -> int:
    return self.nodes * self.procs_per_node

  @property
  def job_name(self) -> str:
    return self.name or f"flexolmo-{self.run}"

  def command(self) -> list[str]:
    return [*shlex.split(self.executable), self.run, *self.run_args]


def fill(template: str, values: dict[str, str], where: str) -> str:
  """Replaces every ``{{NAME}}``; a placeholder without a value is an error naming it."""
  missing = sorted(set(_PLACEHOLDER.findall(template)) - set(values))
  if missing:
    raise ValueError(f"{where}: no value for placeholder(s) {missing}.")
  return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), template)


def render(job: Job, launch_dir: str = LAUNCH_DIR) -> str:
  """The job file (slurm, k8s) or command line (xpk, local) for ``job``."""
  command = job.command()
  if job.engine == "local":
    return shlex.join([os.path.join(launch_dir, "local", "multiprocess.sh"),
                       f"--ntasks={job.processes}", *command])
  if job.engine == "xpk":
    accel = (["--tpu-type", job.tpu_type] if job.tpu_type else
             ["--device-type", job.device_type, "--num-nodes", str(job.nodes)])
    if not job.tpu_type:   # GPU pods: the JobSet's completion index is the process id
      env = (f"FLEXOLMO_COORDINATOR={job.job_name}-slice-job-0-0.{job.job_name}:1234 "
             f"FLEXOLMO_NUM_PROCESSES={job.processes} FLEXOLMO_PROCESS_ID=$JOB_COMPLETION_INDEX ")
    else:                  # TPU VMs: jax.distributed finds the slice's hosts itself
      env = ""
    return shlex.join(["xpk", "workload", "create", "--cluster", job.cluster,
                       "--workload", job.job_name, "--docker-image", job.image, *accel,
                       "--command", env + shlex.join(command)])
  path = os.path.join(launch_dir, TEMPLATES[job.engine])
  with open(path) as fh:
    template = fh.read()
  values = {
      "RUN": job.run, "NAME": job.job_name, "NODES": job.nodes, "PROCESSES": job.processes,
      "PROCS_PER_NODE": job.procs_per_node, "GPUS_PER_NODE": job.gpus_per_node,
      "TIME": job.time, "WORKDIR": shlex.quote(os.path.abspath(job.workdir)),
      "PARTITION_LINE": f"#SBATCH --partition={job.partition}" if job.partition else "",
      "GPU_LINE": f"#SBATCH --gpus-per-node={job.gpus_per_node}" if job.gpus_per_node else "",
      "COMMAND": shlex.join(command), "COMMAND_JSON": json.dumps(command),
      "IMAGE": job.image, "SERVICE_ACCOUNT": job.service_account,
  }
  return fill(template, values, path)


def launch(job: Job, dry_run: bool, out_dir: str = ".") -> str:
  """Prints (dry run) or writes and submits the job; returns the rendered text."""
  text = render(job)
  if dry_run:
    print(text)
    return text
  if job.engine in ("xpk", "local"):
    argv = ["bash", "-c", text]
    tool = "xpk" if job.engine == "xpk" else "bash"
  else:
    path = os.path.join(out_dir, job.job_name + SUFFIX[job.engine])
    with open(path, "w") as fh:
      fh.write(text)
    print(f"wrote {path}")
    argv, tool = [*SUBMIT[job.engine], path], SUBMIT[job.engine][0]
  if shutil.which(tool) is None:
    raise FileNotFoundError(f"launch {job.engine}: `{tool}` is not on PATH here; run with "
                            "--dry-run and submit the printed job where it is.")
  code = subprocess.call(argv)
  if code:
    raise ValueError(f"launch {job.engine}: `{' '.join(argv[:3])}` exited with status {code}.")
  return text


def job_from_args(args, run_args: Sequence[str]) -> Job:
  return Job(engine=args.engine, run=args.run, run_args=tuple(run_args), nodes=args.nodes,
             procs_per_node=args.procs_per_node, gpus_per_node=args.gpus_per_node,
             name=args.name or "", image=args.image, executable=args.executable, time=args.time,
             partition=args.partition or "", workdir=args.workdir,
             service_account=args.service_account, cluster=args.cluster,
             tpu_type=args.tpu_type or "", device_type=args.device_type)
