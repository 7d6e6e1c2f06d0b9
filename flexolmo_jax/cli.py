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
  import json
  import os

  from flexolmo_jax.data import flexmix_mini

  card_path = os.path.join(args.workdir, "flexmix_mini", "flexmix_mini.json")
  if os.path.exists(card_path) and not args.fresh:
    with open(card_path) as fh:
      card = json.load(fh)
    print(f"[1/1] FlexMix-mini: reusing {os.path.dirname(card_path)} (--fresh to rebuild)")
  else:
    print(f"[1/1] FlexMix-mini: building into {os.path.dirname(card_path)}")
    card = flexmix_mini.build(os.path.dirname(card_path), "quick" if args.quick else "default")
  for name, info in card["domains"].items():
    print(f"  {name:>6}: {info['byte_tokens']['train']:,} train byte tokens")
  print("The remaining stages (public model, experts, merge, evaluation, export) are not yet\n"
        "available: they land with issues #4-#7. Meanwhile try:\n"
        "  flexolmo info --model tiny --experts public,code,math --top-k 2")
  return 0


def _cmd_data_prepare(args) -> int:
  from flexolmo_jax.data import sources

  spec = sources.SourceSpec(paths=tuple(args.path), format=args.format, field=args.field,
                            pattern=args.pattern, invalid_utf8=args.invalid_utf8,
                            validation_fraction=args.validation_fraction)
  builder, stats = sources.prepare(args.name, spec, args.data_dir, overwrite=args.overwrite)
  print(f"{args.name}: {stats.documents['train']} train / {stats.documents['validation']} "
        f"validation documents, {stats.empty_skipped} empty skipped, "
        f"{stats.invalid_utf8_replaced} with invalid UTF-8 replaced -> {builder.data_dir}")
  return 0


def _cmd_data_flexmix(args) -> int:
  from flexolmo_jax.data import flexmix_mini

  flexmix_mini.build(args.out, args.size)
  return 0


def _cmd_data_inspect(args) -> int:
  import os

  import tensorflow_datasets as tfds

  from flexolmo_jax.data import sources

  path = os.path.join(args.data_dir, sources.dataset_name(args.name), "1.0.0")
  if not sources.is_prepared(path):
    raise FileNotFoundError(f"{path} is not a prepared dataset; run `flexolmo data prepare`.")
  builder = tfds.builder_from_directory(path)
  for split, info in builder.info.splits.items():
    print(f"{split}: {info.num_examples} documents")
  for i, ex in enumerate(tfds.as_numpy(builder.as_dataset(split="train").take(args.examples))):
    text = ex["text"].decode("utf-8")
    print(f"--- example {i} ({len(text)} chars)\n{text[:300]}")
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
  data = sub.add_parser("data", help="prepare and inspect local corpora").add_subparsers(
      dest="data_command", required=True)
  prep = data.add_parser("prepare", help="a local corpus -> a TFDS dataset on this disk")
  prep.add_argument("--name", required=True)
  prep.add_argument("--path", action="append", required=True, help="file or directory (repeat)")
  prep.add_argument("--format", default="auto", choices=["auto", "text", "jsonl"])
  prep.add_argument("--field", default="text", help="JSONL text field")
  prep.add_argument("--pattern", default="**/*", help="glob for directories")
  prep.add_argument("--invalid-utf8", default="replace", choices=["replace", "error"])
  prep.add_argument("--validation-fraction", type=float, default=0.05)
  prep.add_argument("--data-dir", default="data/tfds")
  prep.add_argument("--overwrite", action="store_true")
  prep.set_defaults(fn=_cmd_data_prepare)
  fm = data.add_parser("flexmix-mini", help="build the embedded default corpus")
  fm.add_argument("--out", default="data/flexmix_mini")
  fm.add_argument("--size", default="default", choices=["default", "quick"])
  fm.set_defaults(fn=_cmd_data_flexmix)
  ins = data.add_parser("inspect", help="counts and a few decoded examples")
  ins.add_argument("name")
  ins.add_argument("--data-dir", default="data/tfds")
  ins.add_argument("--examples", type=int, default=3)
  ins.set_defaults(fn=_cmd_data_inspect)
  demo = sub.add_parser("demo", help="the end-to-end demo on FlexMix-mini")
  demo.add_argument("--workdir", default="workdir")
  demo.add_argument("--quick", action="store_true", help="small sizes (for tests)")
  demo.add_argument("--fresh", action="store_true", help="rebuild every stage")
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
