"""Combining models: ``merge`` (FlexOlmo) and the baselines ``soup``, ``btm``, ``btx``."""
from __future__ import annotations

from flexolmo_jax.cli.args import count, natural, number


def _merge(args) -> int:
  from flexolmo_jax.flexolmo import merge

  merge.merge(args.public, args.expert or [], args.out, exclude=args.exclude or [],
              top_k=args.top_k, top_k_policy=args.top_k_policy,
              negative_bias=not args.drop_negative_bias, overwrite=args.overwrite,
              expert_bias=args.expert_bias)
  return 0


def _soup(args) -> int:
  from flexolmo_jax.baselines import soup

  print(f"model soup -> {soup.soup(args.dense, args.out, overwrite=args.overwrite)}")
  return 0


def _btm(args) -> int:
  from flexolmo_jax.baselines import btm

  out = btm.btm(args.dense, args.out, tau=args.tau, top_k=args.top_k, overwrite=args.overwrite)
  print(f"BTM ensemble -> {out}")
  return 0


def _btx(args) -> int:
  from flexolmo_jax.baselines import btx

  out = btx.btx(args.public, args.dense, args.out, top_k=args.top_k, seed=args.seed,
                overwrite=args.overwrite)
  print(f"BTX-lite merge (router untrained) -> {out}\n"
        f"next: flexolmo tune-router --merged {out} --proxy-weight 0 --data PUBLIC_DATA --out RUN")
  return 0


def add_merge(sub) -> None:
  p = sub.add_parser("merge", help="merge the public model and expert artifacts into one MoE")
  p.add_argument("--public", required=True,
                 help="public model (or pretrain run) directory, or a merged checkpoint")
  p.add_argument("--expert", action="append", help="expert artifact or run directory (repeat)")
  p.add_argument("--exclude", action="append", help="leave this expert out for good (repeat)")
  p.add_argument("--out", required=True)
  p.add_argument("--top-k", type=count, help="active experts per token (default min(4, E))")
  p.add_argument("--top-k-policy", default="clamp", choices=["clamp", "reject"],
                 help="when fewer than top-k experts are opted in at inference")
  p.add_argument("--drop-negative-bias", action="store_true",
                 help="drop the experts' negative biases (the reference and HF layout)")
  p.add_argument("--expert-bias", type=number, default=0.0,
                 help="add this (<= 0) to every non-public expert's negative bias, so the "
                      "public expert keeps its training-time share among many experts "
                      "(docs/method.md section 6; default 0, the paper's merge)")
  p.add_argument("--overwrite", action="store_true")
  p.set_defaults(fn=_merge)


def add_baselines(sub) -> None:
  for command, fn, text in (("soup", _soup, "baseline: uniform average of dense models"),
                            ("btm", _btm, "baseline: BTM per-token ensemble of dense models")):
    b = sub.add_parser(command, help=text)
    b.add_argument("--dense", action="append", required=True, help="dense model dir (repeat)")
    b.add_argument("--out", required=True)
    b.add_argument("--overwrite", action="store_true")
    if command == "btm":
      b.add_argument("--tau", type=number, default=1.0)
      b.add_argument("--top-k", type=count)
    b.set_defaults(fn=fn)
  bx = sub.add_parser("btx", help="baseline: BTX-lite, dense FFNs as experts of one MoE "
                      "(then tune-router --proxy-weight 0)")
  bx.add_argument("--public", required=True, help="the public model the dense models continue")
  bx.add_argument("--dense", action="append", required=True, help="dense model dir (repeat)")
  bx.add_argument("--out", required=True)
  bx.add_argument("--top-k", type=count, help="active experts per token (default min(4, E))")
  bx.add_argument("--seed", type=natural, default=0, help="seed of the random router init")
  bx.add_argument("--overwrite", action="store_true")
  bx.set_defaults(fn=_btx)
