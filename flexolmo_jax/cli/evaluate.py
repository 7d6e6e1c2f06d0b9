"""Reading models: ``eval`` (loss per domain, multiple choice), ``generate`` and ``extraction``."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import sys

from flexolmo_jax.cli.args import add_selection_flags, count, named_paths, natural, number


def eval_domains(items, flexmix: str | None) -> dict[str, list[str]]:
  """``--data NAME=PATH``, or ``--data NAME`` for a domain of the FlexMix-mini at ``flexmix``."""
  named = [i for i in items or () if "=" in i]
  bare = [i for i in items or () if "=" not in i]
  out = named_paths(named)
  if bare and not flexmix:
    raise ValueError(f"--data {bare[0]}: write NAME=PATH, or give --flexmix DIR to evaluate on "
                     "FlexMix-mini's domains by name.")
  if bare:
    from flexolmo_jax.data import flexmix_mini

    domains = flexmix_mini.read_card(flexmix)["domains"]
    for name in bare:
      if name not in domains:
        raise ValueError(f"--data {name}: unknown domain; the FlexMix-mini at {flexmix} has "
                         f"{sorted(domains)}.")
      out.setdefault(name, []).append(domains[name]["dataset_dir"])
  return out


def print_privacy(model: str) -> None:
  """Each expert's differential-privacy guarantee (from the merged model's data cards)."""
  from flexolmo_jax.checkpoint import store
  from flexolmo_jax.privacy import accounting

  try:
    manifest = store.read_manifest(model)
  except (FileNotFoundError, ValueError):
    return      # a pretrain run directory or an HF directory: eval resolves and reports those
  for name, card in manifest.get("data_cards", {}).items():
    print(accounting.describe(name, card))


def _losses(args, data, vocab) -> dict:
  from flexolmo_jax.data import tasks
  from flexolmo_jax.eval import perplexity

  batches = tasks.eval_batches(data, vocab, args.data_dir, args.seq_len, args.batch_size)
  stats = perplexity.evaluate_stats(args.model, batches, args.experts, args.exclude,
                                    max_batches=args.max_batches, vocab=vocab)
  print(f"{'domain':>10}  {'loss':>8}  {'ppl':>9}  {'bits/byte':>9}")
  for name, s in stats.items():
    bpb = f"{s['bits_per_byte']:.4f}" if s["bits_per_byte"] is not None else "-"
    print(f"{name:>10}  {s['loss']:8.4f}  {s['perplexity']:9.3f}  {bpb:>9}")
  print(f"{'average':>10}  {sum(s['loss'] for s in stats.values()) / len(stats):8.4f}")
  return stats


def _multiple_choice(args, tasks_mc, vocab) -> dict:
  from flexolmo_jax.checkpoint import saved
  from flexolmo_jax.eval import scoring

  cfg, params, _ = saved.open_saved(args.model, args.experts, args.exclude)
  scorer = scoring.Scorer(cfg, params, batch_size=args.batch_size)
  report = {}
  for name, paths in tasks_mc.items():
    questions = [q for path in paths for q in scoring.read_multiple_choice(path)]
    result = scoring.multiple_choice(scorer, vocab, questions)
    print(f"{name:>10}  acc {result['acc']:.4f}  acc_norm {result['acc_norm']:.4f}  "
          f"({result['questions']} questions)")
    report[name] = result
  return report


def _routing(args, data, vocab) -> dict:
  """Where the router sends each domain, per layer, and the geometry of its rows: the numbers
  that say whether a merged model routes to its owners (docs/usage.md, "Reading the router")."""
  import itertools

  import numpy as np

  from flexolmo_jax.checkpoint import saved
  from flexolmo_jax.experts import PUBLIC
  from flexolmo_jax.data import tasks
  from flexolmo_jax.eval import routing

  cfg, params, _ = saved.open_saved(args.model, args.experts, args.exclude)
  if not cfg.is_moe:
    raise ValueError(f"eval --routing: {args.model} is a dense model; it has no router.")
  names = cfg.experts
  table = lambda values: "  ".join(f"{n} {v:6.3f}" for n, v in zip(names, values))
  geometry = routing.row_geometry(cfg, params)
  report = {"experts": list(names), "top_k": cfg.top_k,
            "rows": {k: v.tolist() for k, v in geometry.items()}, "domains": {}}
  print(f"router: {len(names)} experts, top-k {cfg.top_k}")
  for layer in range(geometry["norm"].shape[0]):
    print(f"layer {layer} row norm     {table(geometry['norm'][layer])}")
    if PUBLIC in names:
      print(f"layer {layer} cos(public)  "
            f"{table(geometry['cosine'][layer, names.index(PUBLIC)])}")
    print(f"layer {layer} bias         {table(geometry['negative_bias'][layer])}")
  for name, paths in data.items():
    batches = tasks.eval_batches({name: paths}, vocab, args.data_dir, args.seq_len,
                                 args.batch_size)[name]
    if args.max_batches:
      batches = itertools.islice(batches, args.max_batches)
    stats = routing.layer_routing(cfg, params, batches)
    report["domains"][name] = {k: v.tolist() for k, v in stats.items()}
    for layer in range(stats["probs"].shape[0]):
      print(f"{name:>10} layer {layer} |x| {stats['hidden_norm'][layer]:7.2f}  logit spread "
            f"{stats['spread'][layer]:6.3f}  prob  {table(stats['probs'][layer])}")
    print(f"{name:>10} mean prob   {table(np.mean(stats['probs'], axis=0))}")
  return report


def _eval(args) -> int:
  """Per-domain losses (data-parallel over processes: each scores its shard of the stream)
  and multiple-choice accuracy (every process scores every question); process 0 alone prints
  and writes ``--json``."""
  from flexolmo_jax import distributed
  from flexolmo_jax.checkpoint import saved

  leader = distributed.is_leader()
  with contextlib.redirect_stdout(sys.stdout if leader else io.StringIO()):
    data, tasks_mc = eval_domains(args.data, args.flexmix), named_paths(args.mc)
    if not data and not tasks_mc:
      raise ValueError("eval needs at least one --data NAME=PATH or --mc NAME=FILE.jsonl.")
    vocab = saved.vocabulary(args.model)
    print_privacy(args.model)
    if args.routing and not data:
      raise ValueError("eval --routing needs --data: the routing is measured on its tokens.")
    report = {**(_losses(args, data, vocab) if data else {}),
              **(_multiple_choice(args, tasks_mc, vocab) if tasks_mc else {})}
    if args.routing:
      report["routing"] = _routing(args, data, vocab)
  if args.json and leader:
    with open(args.json, "w") as fh:
      json.dump(report, fh, indent=2)
  return 0


def _generate(args) -> int:
  from flexolmo_jax.checkpoint import saved
  from flexolmo_jax.eval import generate

  cfg, params, _ = saved.open_saved(args.model, args.experts, args.exclude)
  vocab = saved.vocabulary(args.model)
  sampling = generate.Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                               seed=args.seed)
  eos = vocab.eos_id
  for prompt in args.prompt:
    ids = list(vocab.encode(prompt))
    if not ids:
      raise ValueError("An empty prompt has no token to continue from.")
    rows = generate.generate(cfg, params, [ids] * args.num_samples, args.max_new_tokens,
                             sampling, eos_id=eos, pad_id=vocab.pad_id)
    for i, row in enumerate(rows):
      new = generate.trim(row, len(ids), eos)[len(ids):]
      text = vocab.decode([t for t in new if t != eos])
      print(f"--- prompt {prompt!r}, sample {i + 1}/{args.num_samples}:\n{prompt}{text}")
  return 0


def _extraction(args) -> int:
  """The extraction evaluation (docs/method.md §9) of any saved model on an owner's documents."""
  from flexolmo_jax.checkpoint import saved
  from flexolmo_jax.data import sources
  from flexolmo_jax.eval import extraction

  config = extraction.ExtractionConfig(
      prefix=args.prefix, total=args.total, samples=args.samples, threshold=args.threshold,
      min_length=args.min_length, top_k=args.top_k, top_p=args.top_p,
      temperature=args.temperature, seed=args.seed)
  spec = sources.SourceSpec(tuple(args.documents), field=args.field,
                            validation_fraction=args.validation_fraction)
  vocab = saved.vocabulary(args.model)
  tested, read = extraction.documents_to_test(spec, vocab, config,
                                              args.split == "train", args.max_documents)
  cfg, params, _ = saved.open_saved(args.model, args.experts, args.exclude)
  if config.total > cfg.max_seq_len:
    raise ValueError(f"--total {config.total} is longer than the model's max_seq_len "
                     f"{cfg.max_seq_len}.")
  print(f"extraction: {len(tested)} of the {read} documents read in {', '.join(spec.paths)} (at "
        f"least {config.min_length} tokens), {config.samples} samples each of {config.total} "
        f"tokens after a {config.prefix}-token prefix", flush=True)
  result = extraction.evaluate(cfg, params, tested, config, vocab.eos_id,
                               progress=lambda done, total: print(f"  {done}/{total} documents",
                                                                  flush=True))
  for row in result["per_document"]:
    if row["best_similarity"] >= config.threshold:
      print(f"  extracted: {row['document']} (similarity {row['best_similarity']:.3f})")
  print(f"{result['extracted']}/{result['documents']} documents extracted (rate "
        f"{result['rate']:.4f}), mean best similarity {result['mean_best_similarity']:.3f}, "
        f"teacher-forced loss {result['loss']:.3f} nats per token")
  if args.json:
    with open(args.json + ".tmp", "w") as fh:
      json.dump({"model": args.model, "experts": args.experts, "exclude": args.exclude,
                 "documents": list(spec.paths), "split": args.split,
                 "config": dataclasses.asdict(config), **result}, fh, indent=2)
    os.replace(args.json + ".tmp", args.json)
  return 0


def add_eval(sub) -> None:
  p = sub.add_parser("eval", help="validation loss per domain of any saved model")
  p.add_argument("--model", required=True, help="public, dense, merged or btm directory")
  add_selection_flags(p)
  p.add_argument("--data", action="append",
                 help="NAME=PATH validation domain, or NAME of a --flexmix domain (repeat)")
  p.add_argument("--flexmix", help="a FlexMix-mini directory whose domains --data NAME names")
  p.add_argument("--mc", action="append",
                 help="NAME=FILE.jsonl multiple-choice task: {context, choices, answer} lines")
  p.add_argument("--data-dir", default="data/eval", help="where raw paths are prepared")
  p.add_argument("--seq-len", type=count, default=256)
  p.add_argument("--batch-size", type=count, default=16)
  p.add_argument("--max-batches", type=count)
  p.add_argument("--routing", action="store_true",
                 help="also report the router of a merged model: each domain's mean router "
                      "probability and logit spread per layer, the rows' norms, cosines and bias")
  p.add_argument("--json", help="write every number here")
  p.set_defaults(fn=_eval)


def add_generate(sub) -> None:
  p = sub.add_parser("generate", help="continue prompts with any saved model (KV cache)")
  p.add_argument("--model", required=True, help="public, dense or merged model directory")
  add_selection_flags(p)
  p.add_argument("--prompt", action="append", required=True, help="text to continue (repeat)")
  p.add_argument("--max-new-tokens", type=count, default=64)
  p.add_argument("--temperature", type=number, default=0.0, help="0 is greedy")
  p.add_argument("--top-k", type=count)
  p.add_argument("--top-p", type=number)
  p.add_argument("--seed", type=natural, default=0)
  p.add_argument("--num-samples", type=count, default=1)
  p.set_defaults(fn=_generate)


def add_extraction(sub) -> None:
  p = sub.add_parser("extraction", help="training-data extraction (docs/method.md §9) of any "
                     "saved model on an owner's documents")
  p.add_argument("--model", required=True, help="public, dense or merged model directory")
  add_selection_flags(p)
  p.add_argument("--documents", action="append", required=True,
                 help="the owner's files or directories, text or JSONL as `data prepare` "
                      "reads them, e.g. with planted canaries (repeat)")
  p.add_argument("--field", default="text", help="the text field of JSONL records")
  p.add_argument("--split", choices=["all", "train"], default="all",
                 help="train: only the documents `data prepare` puts in the train split")
  p.add_argument("--validation-fraction", type=number, default=0.05,
                 help="the split's fraction, as the data was prepared (with --split train)")
  p.add_argument("--max-documents", type=count, help="test this many, drawn with --seed")
  p.add_argument("--prefix", type=count, default=32)
  p.add_argument("--total", type=count, default=256, help="span length, prefix included")
  p.add_argument("--min-length", type=count, default=128, help="shorter documents are skipped")
  p.add_argument("--samples", type=count, default=10)
  p.add_argument("--threshold", type=number, default=0.9,
                 help="normalized Levenshtein similarity that counts as extracted")
  p.add_argument("--top-k", type=count, default=50)
  p.add_argument("--top-p", type=number, default=0.95)
  p.add_argument("--temperature", type=number, default=1.0)
  p.add_argument("--seed", type=natural, default=0)
  p.add_argument("--json", help="write every number (and each document's similarity) here")
  p.set_defaults(fn=_extraction)
