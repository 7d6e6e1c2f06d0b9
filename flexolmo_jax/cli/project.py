"""The commands around the method's steps: ``info`` (a preset's sizes), ``plan`` (a run compiled
for a target, with its memory and speed), ``launch`` (a cluster job for one run) and ``demo``
(every step on FlexMix-mini)."""
from __future__ import annotations

import argparse
import re
import sys

from flexolmo_jax import console
from flexolmo_jax.cli.args import count, natural


def _info(args) -> int:
  from flexolmo_jax import experts
  from flexolmo_jax.config import load_model_config

  cfg = load_model_config(args.model, args.gin)
  if args.experts:
    cfg = cfg.replace(experts=tuple(experts.parse(args.experts)), top_k=args.top_k or cfg.top_k)
  print(cfg)
  print(f"parameters: {cfg.num_params():,} total, {cfg.active_params():,} active per token")
  return 0


def _plan(args) -> int:
  import json

  from flexolmo_jax import sharding
  from flexolmo_jax.plan import programs, report, settings, targets

  with console.native_stdout_silenced():
    target = targets.resolve(args.topology, args.num_slices)
  run = settings.resolve(args.task, args.model, args.gin_file, args.gin,
                         batch_size=args.batch_size, seq_len=args.seq_len, mesh=args.mesh,
                         bf16=args.bf16, anchor_dtype=args.anchor_dtype)
  cfg, train, ecfg = run.model, run.train, run.expert
  mesh = sharding.make_mesh(train.mesh, devices=target.devices)
  rules = sharding.ShardingRules()
  n = len(target.devices)
  print(f"compiling {args.task} of {args.model} for {target.name} ({n} device"
        f"{'s' if n > 1 else ''}): the step, then 1 and 2 unrolled layers for its FLOPs "
        "(minutes for a 7B model)",
        file=sys.stderr, flush=True)
  with console.native_stdout_silenced():   # libtpu may speak again when it first compiles
    result = report.plan(lambda c: programs.build(args.task, c, train, mesh, rules, ecfg), cfg,
                         target, mesh)
  print(report.render(result))
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(result, fh, indent=1)
  return 0


def _launch(args) -> int:
  from flexolmo_jax import launch

  launch.launch(launch.job_from_args(args, args.run_args), dry_run=args.dry_run)
  return 0


def _demo(args) -> int:
  from flexolmo_jax import demo

  demo.run(args.workdir, quick=args.quick, fresh=args.fresh, seed=args.seed, jobs=args.jobs,
           ablations=args.ablations)
  return 0


def add_info(sub) -> None:
  p = sub.add_parser("info", help="print a model preset and its parameter counts")
  p.add_argument("--model", default="tiny", help="preset name (gin_configs/models) or gin file")
  p.add_argument("--gin", action="append", default=[], help="extra gin binding")
  p.add_argument("--experts", default="", help="comma-separated expert names (MoE)")
  p.add_argument("--top-k", type=natural, default=0)
  p.set_defaults(fn=_info)


def mesh_spec(text: str) -> dict[str, int]:
  """``AXIS=SIZE[,AXIS=SIZE...]`` over data, fsdp, tensor, expert (one size may be -1)."""
  from flexolmo_jax.config import MESH_AXES

  sizes = {}
  for item in text.split(","):
    axis, sep, size = item.partition("=")
    if not sep or axis not in MESH_AXES or not re.fullmatch(r"-1|[1-9]\d{0,5}", size):
      raise argparse.ArgumentTypeError(
          f"{item!r}: write AXIS=SIZE with AXIS one of {', '.join(MESH_AXES)} (e.g. fsdp=-1).")
    sizes[axis] = int(size)
  return sizes


def add_plan(sub) -> None:
  from flexolmo_jax.plan import TASKS

  p = sub.add_parser("plan", help="compile a run for this host or a TPU topology (no TPU "
                     "needed): bytes per device, fits, FLOPs, estimated step time, collectives")
  p.add_argument("--model", default="tiny", help="model preset (gin_configs/models) or gin file")
  p.add_argument("--gin-file", action="append", default=[],
                 help="a gin file of the run, as its command takes it (repeat): its model, "
                      "batch, length, mesh and expert settings; the flags below win")
  p.add_argument("--gin", action="append", default=[],
                 help="model binding, e.g. \"flexolmo.ModelConfig.remat='full'\" (repeat)")
  p.add_argument("--task", choices=TASKS, default="pretrain")
  p.add_argument("--topology", default="cpu",
                 help="cpu (this host's devices) or a TPU topology: v4:2x2x2, v5e:4x4, "
                      "v5p:4x4x8, v6e:16x16 (needs the tpu extra)")
  p.add_argument("--num-slices", type=count, default=1, help="TPU slices over DCN")
  p.add_argument("--batch-size", type=count,
                  help="global sequences per step (default: the run's, else 16)")
  p.add_argument("--seq-len", type=count, help="default: the run's, else 256")
  # FSDP over every device is how a pod trains a 7B model; --mesh data=-1 plans a laptop run.
  p.add_argument("--mesh", type=mesh_spec,
                 help="mesh axes, e.g. data=2,fsdp=-1 or data=-1 (default: the run's, else "
                      "fsdp=-1)")
  p.add_argument("--bf16", action="store_true", help="bfloat16 compute (parameters as stored)")
  p.add_argument("--anchor-dtype", choices=("float32", "bfloat16"),
                 help="train-expert: hold the frozen public model in this dtype")
  p.add_argument("--json", help="write the plan here as JSON")
  p.set_defaults(fn=_plan)


def add_launch(sub) -> None:
  from flexolmo_jax import launch

  p = sub.add_parser(
      "launch", help="fill a launch/ template (SLURM, JobSet, xpk, local) for one run",
      description="flexolmo launch ENGINE --run RUN [options] [--dry-run] -- RUN'S OWN FLAGS "
                  "(e.g. -- --gin-file my_experiment.gin --out gs://bucket/run)")
  p.add_argument("engine", choices=launch.ENGINES)
  p.add_argument("--run", required=True, help="the flexolmo sub-command the job runs")
  p.add_argument("--nodes", type=count, default=1)
  p.add_argument("--procs-per-node", type=count, default=1,
                 help="1: one process drives every device of its node; or one per GPU")
  p.add_argument("--gpus-per-node", type=natural, default=0)
  p.add_argument("--name", help="job name (default flexolmo-RUN)")
  p.add_argument("--image", default="flexolmo-jax:latest", help="container image (k8s, xpk)")
  p.add_argument("--executable", default="flexolmo", help="how the job starts the CLI")
  p.add_argument("--time", default="24:00:00", help="SLURM time limit")
  p.add_argument("--partition", help="SLURM partition")
  p.add_argument("--workdir", default=".", help="directory the SLURM job runs in")
  p.add_argument("--service-account", default="default", help="Kubernetes service account")
  p.add_argument("--cluster", default="CLUSTER", help="xpk cluster")
  p.add_argument("--tpu-type", help="xpk on TPU, e.g. v5p-256")
  p.add_argument("--device-type", default="h100-80gb-8", help="xpk on GPU")
  p.add_argument("--dry-run", action="store_true", help="print the filled job, submit nothing")
  p.set_defaults(fn=_launch)


def add_demo(sub) -> None:
  p = sub.add_parser("demo", help="the end-to-end demo on FlexMix-mini")
  p.add_argument("--workdir", default="workdir")
  p.add_argument("--quick", action="store_true", help="small sizes (for tests)")
  p.add_argument("--fresh", action="store_true", help="delete the workdir, rebuild every stage")
  p.add_argument("--seed", type=natural, default=0,
                 help="seed of every training stage (a finished stage is reused whatever it was)")
  p.add_argument("--jobs", type=count, default=2,
                 help="training processes at once for the independent experts and dense "
                      "models (each process still holds one owner's data only)")
  p.add_argument("--ablations", action="store_true",
                 help="also the paper's ablations: no negative bias, random router init, "
                      "uncoordinated experts (each trained, merged and tuned)")
  p.set_defaults(fn=_demo)
