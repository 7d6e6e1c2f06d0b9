"""The ``flexolmo`` command: one sub-command per step of the method (docs/architecture.md).

Each sub-command lives in a short module of this package that adds its parser and calls the
library; here are the parts every command shares: switches, gin and multi-host flags, paths made
absolute, the multi-host policy and one-line errors.
"""
from __future__ import annotations

import os
import sys

from flexolmo_jax import console, paths
from flexolmo_jax.cli import (benchmarks, combine, data, evaluate, hf, process, project, serve,
                              train)
from flexolmo_jax.cli.args import Parser
from flexolmo_jax.cli.evaluate import print_privacy
from flexolmo_jax.cli.run_config import split_gin_flags

__all__ = ["main", "build_parser", "print_privacy", "split_gin_flags", "absolute_paths"]

DISTRIBUTED_FLAGS = {"--coordinator": "coordinator", "--num-processes": "num_processes",
                     "--process-id": "process_id"}


# Sub-commands whose data, checkpoint and report paths are multi-host safe (per-host shards,
# process 0 alone writing manifests), proven by tests/test_multihost.py; the others refuse a
# multi-process start up front.
MULTI_PROCESS_COMMANDS: frozenset[str] = frozenset({"pretrain", "train-expert", "train-dense",
                                                    "tune-router", "eval"})
# One host's work (combining and converting checkpoints, generating from a few prompts): in a
# multi-process launch (one job file for every step of an experiment) process 0 does it alone, as
# a single process on its own devices, and the other processes exit at once with status 0.
# Nothing is sharded, so nothing is gained from more hosts, and no runtime is started that could
# wait for absent peers.
LEADER_COMMANDS: frozenset[str] = frozenset({"merge", "btx", "export-hf", "import-hf",
                                             "generate", "extraction", "lm-eval"})


def split_distributed_flags(argv):
  """Takes ``--coordinator HOST:PORT``, ``--num-processes N`` and ``--process-id I`` (or their
  ``--flag=value`` forms) from anywhere on the command line: they belong to every sub-command."""
  rest, found, i = [], {}, 0
  while i < len(argv):
    flag, sep, value = argv[i].partition("=")
    if flag in DISTRIBUTED_FLAGS:
      if not sep:
        if i + 1 >= len(argv):
          raise ValueError(f"{flag} needs a value.")
        i, value = i + 1, argv[i + 1]
      found[DISTRIBUTED_FLAGS[flag]] = value
    else:
      rest.append(argv[i])
    i += 1
  return rest, found


def build_parser() -> Parser:
  p = Parser(
      prog="flexolmo", description=__doc__.split("\n\n")[0],
      epilog="Multi-host: every sub-command takes --coordinator HOST:PORT --num-processes N "
             "--process-id I (or FLEXOLMO_COORDINATOR/_NUM_PROCESSES/_PROCESS_ID; SLURM, Open MPI "
             "and TPU VMs are detected), see flexolmo_jax/distributed.py and launch/.")
  p.add_argument("--verbose", action="store_true",
                 help="keep the libraries' start-up logs (TensorFlow, XLA, seqio, Orbax); also "
                      "FLEXOLMO_VERBOSE=1. Accepted anywhere on the command line.")
  p.add_argument("--no-verify", action="store_true",
                 help="trusted local use: do not hash the files of saved models when loading "
                      "them (sizes are still checked); also FLEXOLMO_NO_VERIFY=1. Anywhere on "
                      "the command line.")
  sub = p.add_subparsers(dest="command", required=True)
  # In the order of the method: data, the public model, experts, merge, router, baselines, use.
  for add in (project.add_info, data.add, train.add_pretrain, train.add_train_expert,
              combine.add_merge, train.add_train_dense, combine.add_baselines,
              train.add_tune_router, evaluate.add_generate, serve.add, evaluate.add_extraction,
              hf.add,
              evaluate.add_eval, benchmarks.add, project.add_plan, project.add_launch, project.add_demo):
    add(sub)
  return p


# Flags that name local files or directories; made absolute once, before any command runs.
PATH_FLAGS = ("out", "public", "expert", "hf", "documents", "dense", "merged", "flexmix", "json",
              "path", "data_dir", "workdir", "gin_file", "dp_router_proxy", "include_path")
NAMED_PATH_FLAGS = ("eval_data", "mc")   # NAME=PATH


def absolute_paths(args) -> None:
  """Every path flag of ``args`` made absolute (:mod:`flexolmo_jax.paths`), in place."""
  for dest in PATH_FLAGS:
    if getattr(args, dest, None) is not None:
      setattr(args, dest, paths.absolute_all(getattr(args, dest)))
  named = NAMED_PATH_FLAGS + (("data",) if args.command == "eval" else ())
  for dest in named:
    if getattr(args, dest, None) is not None:
      setattr(args, dest, [paths.absolute_named(item) for item in getattr(args, dest)])
  if args.command != "eval" and getattr(args, "data", None) is not None:
    args.data = paths.absolute_all(args.data)
  if getattr(args, "vocabulary", None) not in (None, "byte"):
    args.vocabulary = paths.absolute(args.vocabulary)
  model = getattr(args, "model", None)   # a saved model, or (pretrain, info, plan) a preset
  if model is not None and (args.command not in ("pretrain", "info", "plan")
                            or os.path.exists(model)):
    args.model = paths.absolute(model)


def main(argv=None) -> int:
  """``flexolmo ARGV``: its exit status. From the command line (``argv`` None) the process is
  the command's own: its allocator and garbage collector are set for it (cli/process.py)."""
  if argv is not None:
    return _main(argv, from_command_line=False)
  with process.own():
    return _main(sys.argv[1:], from_command_line=True)


def _main(argv: list[str], from_command_line: bool) -> int:
  argv = list(argv)
  run_args: list[str] = []
  if argv[:1] == ["launch"] and "--" in argv:   # the launched run's flags, kept verbatim
    cut = argv.index("--")
    argv, run_args = argv[:cut], argv[cut + 1:]
  argv = console.take_switches(argv)
  console.configure(native=from_command_line)
  try:
    argv, gin_bindings = split_gin_flags(argv)
    argv, multi = split_distributed_flags(argv)
  except ValueError as e:
    print(f"flexolmo: error: {e}", file=sys.stderr)
    return 2
  try:
    args = build_parser().parse_args(argv)
  except SystemExit as e:    # --help (0), or a bad flag (2, its one-line message printed)
    return e.code if isinstance(e.code, int) else 2
  args.gin_bindings = gin_bindings
  args.run_args = run_args
  absolute_paths(args)
  try:
    from flexolmo_jax import distributed   # starts no runtime; imports JAX

    distributed.patient_cpu_collectives()
    topology = distributed.detect(**multi)
    if topology.multi_process and args.command in LEADER_COMMANDS:
      if topology.process_id != 0:
        print(f"flexolmo {args.command}: process {topology.process_id} of "
              f"{topology.num_processes} ({topology.source}) has nothing to do: process 0 does "
              "this host-side work alone.")
        return 0
      topology = distributed.Topology("single")
    elif topology.multi_process and args.command not in MULTI_PROCESS_COMMANDS:
      raise ValueError(
          f"`flexolmo {args.command}` runs as one process for now ({topology.source} asked for "
          f"{topology.num_processes}); multi-host data, checkpoint and report paths are not "
          "finished (flexolmo_jax/distributed.py starts the runtime).")
    distributed.initialize(topology)
    return args.fn(args)
  except (ValueError, OSError) as e:   # bad input: one line naming the file, key or flag
    message = " ".join(str(e).split()) or type(e).__name__
    print(f"flexolmo {args.command}: error: {message}", file=sys.stderr)
    return 2

