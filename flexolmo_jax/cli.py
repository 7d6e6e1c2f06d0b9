"""The ``flexolmo`` command: one sub-command per step of DESIGN.md "What a user does with it"."""
from __future__ import annotations

import argparse
import sys


def _cmd_info(args) -> int:
  from flexolmo_jax.config import load_model_config

  cfg = load_model_config(args.model, args.gin)
  if args.experts:
    cfg = cfg.replace(experts=tuple(args.experts.split(",")), top_k=args.top_k or cfg.top_k)
  print(cfg)
  print(f"parameters: {cfg.num_params():,} total, {cfg.active_params():,} active per token")
  return 0


def _cmd_demo(args) -> int:
  print("flexolmo demo: not yet available. The end-to-end demo (data -> public model -> experts ->\n"
        "merge -> eval -> export) lands with the evaluation/demo issue. Meanwhile try:\n"
        "  flexolmo info --model tiny --experts public,code,math --top-k 2")
  return 0


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="flexolmo", description=__doc__)
  sub = p.add_subparsers(dest="command", required=True)
  info = sub.add_parser("info", help="print a model preset and its parameter counts")
  info.add_argument("--model", default="tiny", help="preset name (gin_configs/models) or gin file")
  info.add_argument("--gin", action="append", default=[], help="extra gin binding")
  info.add_argument("--experts", default="", help="comma-separated expert names (MoE)")
  info.add_argument("--top-k", type=int, default=0)
  info.set_defaults(fn=_cmd_info)
  demo = sub.add_parser("demo", help="the end-to-end demo on FlexMix-mini")
  demo.add_argument("--workdir", default="workdir")
  demo.set_defaults(fn=_cmd_demo)
  return p


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    return args.fn(args)
  except (ValueError, FileNotFoundError) as e:
    print(f"flexolmo {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
