"""Hugging Face: ``export-hf`` (a model -> a HF checkpoint) and ``import-hf`` (and back)."""
from __future__ import annotations

from flexolmo_jax.cli.args import add_selection_flags


def _export(args) -> int:
  from flexolmo_jax.convert import export

  export.export_hf(args.model, args.out, experts=args.experts, exclude=args.exclude,
                   dtype=args.dtype, shard_size=args.shard_size,
                   drop_negative_bias=args.drop_negative_bias, overwrite=args.overwrite)
  return 0


def _import(args) -> int:
  from flexolmo_jax import experts
  from flexolmo_jax.convert import importer

  importer.import_hf(args.hf, args.out, names=experts.parse(args.names) or None,
                     split=args.split, vocabulary=args.vocabulary, overwrite=args.overwrite)
  return 0


def add(sub) -> None:
  exh = sub.add_parser("export-hf", help="a merged (FlexOlmo) or dense (OLMo-2) model -> a "
                       "Hugging Face checkpoint")
  exh.add_argument("--model", required=True, help="merged, public or dense model directory")
  add_selection_flags(exh)
  exh.add_argument("--out", required=True)
  exh.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
  exh.add_argument("--shard-size", default="5GB", help="largest safetensors file (e.g. 5GB)")
  exh.add_argument("--drop-negative-bias", action="store_true",
                   help="export a model whose experts carry a negative router bias without it")
  exh.add_argument("--overwrite", action="store_true")
  exh.set_defaults(fn=_export)
  imh = sub.add_parser("import-hf", help="a Hugging Face OLMo-2 or FlexOlmo checkpoint -> a "
                       "public model or a merged checkpoint")
  imh.add_argument("--hf", required=True, help="Hugging Face model directory")
  imh.add_argument("--out", required=True)
  imh.add_argument("--names", help="names of experts 1..n-1 of a FlexOlmo model: a,b,c")
  imh.add_argument("--split", action="store_true", help="also keep the public model and each "
                   "expert artifact: OUT/public, OUT/experts/NAME, OUT/merged")
  imh.add_argument("--vocabulary", help="'byte', a SentencePiece .model or a tokenizer.json (default: from the "
                   "tokenizer files)")
  imh.add_argument("--overwrite", action="store_true")
  imh.set_defaults(fn=_import)
