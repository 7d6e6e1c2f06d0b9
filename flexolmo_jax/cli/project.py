"""The commands around the method's steps: ``info`` (a preset's sizes), ``launch`` (a cluster
job for one run) and ``demo`` (every step on FlexMix-mini)."""
from __future__ import annotations

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


def _launch(args) -> int:
  from flexolmo_jax import launch

  launch.launch(launch.job_from_args(args, args.run_args), dry_run=args.dry_run)
  return 0


def _demo(args) -> int:
  from flexolmo_jax import demo

  demo.run(args.workdir, quick=args.quick, fresh=args.fresh, seed=args.seed, jobs=args.jobs)
  return 0


def add_info(sub) -> None:
  p = sub.add_parser("info", help="print a model preset and its parameter counts")
  p.add_argument("--model", default="tiny", help="preset name (gin_configs/models) or gin file")
  p.add_argument("--gin", action="append", default=[], help="extra gin binding")
  p.add_argument("--experts", default="", help="comma-separated expert names (MoE)")
  p.add_argument("--top-k", type=natural, default=0)
  p.set_defaults(fn=_info)


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
  p.set_defaults(fn=_demo)
