"""``flexolmo data``: prepare a local corpus as a dataset, build FlexMix-mini, inspect."""
from __future__ import annotations

import os

from flexolmo_jax.cli.args import natural, number


def _prepare(args) -> int:
  from flexolmo_jax.data import sources

  spec = sources.SourceSpec(paths=tuple(args.path), format=args.format, field=args.field,
                            pattern=args.pattern, invalid_utf8=args.invalid_utf8,
                            validation_fraction=args.validation_fraction)
  builder, stats = sources.prepare(args.name, spec, args.data_dir, overwrite=args.overwrite)
  print(f"{args.name}: {stats.documents['train']} train / {stats.documents['validation']} "
        f"validation documents, {stats.empty_skipped} empty skipped, "
        f"{stats.invalid_utf8_replaced} with invalid UTF-8 replaced -> {builder.data_dir}")
  return 0


def _flexmix(args) -> int:
  from flexolmo_jax.data import flexmix_mini

  flexmix_mini.build(args.out, args.size)
  return 0


def _inspect(args) -> int:
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


def add(sub) -> None:
  data = sub.add_parser("data", help="prepare and inspect local corpora").add_subparsers(
      dest="data_command", required=True)
  prep = data.add_parser("prepare", help="a local corpus -> a TFDS dataset on this disk")
  prep.add_argument("--name", required=True)
  prep.add_argument("--path", action="append", required=True, help="file or directory (repeat)")
  prep.add_argument("--format", default="auto", choices=["auto", "text", "jsonl"])
  prep.add_argument("--field", default="text", help="JSONL text field")
  prep.add_argument("--pattern", default="**/*", help="glob for directories")
  prep.add_argument("--invalid-utf8", default="replace", choices=["replace", "error"])
  prep.add_argument("--validation-fraction", type=number, default=0.05)
  prep.add_argument("--data-dir", default="data/tfds")
  prep.add_argument("--overwrite", action="store_true")
  prep.set_defaults(fn=_prepare)
  fm = data.add_parser("flexmix-mini", help="build the embedded default corpus")
  fm.add_argument("--out", default="data/flexmix_mini")
  fm.add_argument("--size", default="default", choices=["default", "quick"])
  fm.set_defaults(fn=_flexmix)
  ins = data.add_parser("inspect", help="counts and a few decoded examples")
  ins.add_argument("name")
  ins.add_argument("--data-dir", default="data/tfds")
  ins.add_argument("--examples", type=natural, default=3)
  ins.set_defaults(fn=_inspect)
