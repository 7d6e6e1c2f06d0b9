"""The training commands: ``pretrain``, ``train-expert``, ``train-dense``, ``tune-router``.

Each is a gin-configured run (cli/run_config.py); a run stopped by SIGTERM saves its checkpoint
and exits with :data:`PREEMPTED_EXIT`, and running the same command again resumes it."""
from __future__ import annotations

import gin

from flexolmo_jax.cli.args import add_train_flags, count, named_paths, number
from flexolmo_jax.cli.run_config import (DENSE_FLAGS, EXPERT_FLAGS, PRETRAIN_FLAGS, TUNE_FLAGS,
                                         call_configured, parse_run_config)

PREEMPTED_EXIT = 143


def _train(run: str, args, flags: dict[str, str], model: str | None = None) -> int:
  # Every trainer's configurables are registered before the gin files are read.
  from flexolmo_jax.flexolmo import expert, public, router_tune

  # A dense baseline is the public model's training continued on one domain (its gin file sets
  # pretrain's ``init_from``).
  fn = {"pretrain": public.pretrain, "train_expert": expert.train_expert,
        "train_dense": public.pretrain, "tune_router": router_tune.tune_router}[run]
  try:
    parse_run_config(run, args, flags, model=model)
    result, _ = call_configured(fn)
  finally:
    # The bindings end with the command: a caller in the same process (a notebook, a test)
    # must not build its next ExpertConfig or TrainConfig from them, above all after a refusal.
    gin.clear_config()
  return PREEMPTED_EXIT if result.preempted else 0


def _pretrain(args) -> int:
  args.eval_data = named_paths(args.eval_data) if args.eval_data else None
  return _train("pretrain", args, PRETRAIN_FLAGS, model=args.model)


def add_pretrain(sub) -> None:
  p = sub.add_parser("pretrain", help="train the dense public model (gin: runs/pretrain.gin)")
  p.add_argument("--model", default="tiny", help="model preset (gin_configs/models) or gin file")
  p.add_argument("--eval-data", action="append", help="NAME=PATH validation domain (repeat)")
  add_train_flags(p)
  p.set_defaults(fn=_pretrain)


def _add_dp_flags(p) -> None:
  dp = p.add_argument_group("differential privacy (DP-SGD; see flexolmo_jax/privacy)")
  dp.add_argument("--dp", action="store_const", const=True, help="train the expert with DP-SGD")
  dp.add_argument("--target-epsilon", type=number, help="calibrate the noise to this epsilon")
  dp.add_argument("--noise-multiplier", type=number, help="instead of --target-epsilon")
  dp.add_argument("--delta", type=number, help="default 1e-5")
  dp.add_argument("--clip", type=number, help="per-document gradient norm bound (default 1)")
  dp.add_argument("--dp-sampling", choices=["poisson", "fixed"], help="default poisson")
  dp.add_argument("--dp-accountant", choices=["rdp", "pld"], help="default rdp")
  dp.add_argument("--dp-microbatch", type=count, help="per-document gradients held at once (8)")
  dp.add_argument("--dp-chunks", type=count, help="rows of --seq-len kept per document (1)")
  dp.add_argument("--dp-router-init", choices=["noised_mean", "proxy"],
                  help="router row from a noised mean of the owner's documents (default, counted "
                       "in epsilon) or from public proxy text")
  dp.add_argument("--dp-router-noise", type=number, help="noise multiplier of the noised mean (10)")
  dp.add_argument("--dp-router-proxy", action="append",
                  help="public text resembling the owner's data, for --dp-router-init proxy")


def add_train_expert(sub) -> None:
  p = sub.add_parser("train-expert",
                     help="train one owner's expert against the frozen public model")
  p.add_argument("--public", help="public model directory (or pretrain run directory), or a "
                 "merged model to join: the expert trains against its live public router row")
  p.add_argument("--name", help="the expert's name ('public' is reserved)")
  p.add_argument("--top-k", type=count, help="1 or 2 (default 2 of 2)")
  p.add_argument("--router-init", choices=["shared", "per_layer", "random", "classifier"])
  p.add_argument("--router-init-documents", type=count)
  p.add_argument("--router-public-odds", type=number,
                 help="classifier init: prior odds of a token being public (default 1)")
  p.add_argument("--router-lr-scale", type=number,
                 help="the router's learning rate as a multiple of --lr (0 holds it)")
  p.add_argument("--no-negative-bias", dest="negative_bias", action="store_const", const=False)
  p.add_argument("--anchor-dtype", choices=["float32", "bfloat16"],
                 help="hold the frozen public model in this dtype (bfloat16: half its memory)")
  _add_dp_flags(p)
  add_train_flags(p)
  p.set_defaults(fn=lambda args: _train("train_expert", args, EXPERT_FLAGS))


def add_train_dense(sub) -> None:
  p = sub.add_parser("train-dense", help="baseline: the public model continued on one domain")
  p.add_argument("--public", help="public model directory (or pretrain run directory)")
  p.add_argument("--name", help="the domain's name")
  add_train_flags(p)
  p.set_defaults(fn=lambda args: _train("train_dense", args, DENSE_FLAGS))


def add_tune_router(sub) -> None:
  p = sub.add_parser("tune-router",
                     help="tune the router rows of a merged model on public proxy data")
  p.add_argument("--merged", help="merged checkpoint directory")
  p.add_argument("--proxy-fraction", type=number)
  p.add_argument("--proxy-weight", type=number)
  p.add_argument("--expert-dropout", type=number,
                 help="chance each training sequence leaves each non-public expert out, so "
                      "the router learns to do without any owner (default 0, as the paper)")
  p.add_argument("--interpolation", type=number,
                 help="keep this share of the way from the merge's router rows to the tuned ones "
                      "(default 1, as the paper; docs/method.md §6)")
  add_train_flags(p)
  p.set_defaults(fn=lambda args: _train("tune_router", args, TUNE_FLAGS))


def add(sub) -> None:
  add_pretrain(sub)
  add_train_expert(sub)
  add_train_dense(sub)
  add_tune_router(sub)
