"""The ``flexolmo`` command: one sub-command per step of the method (docs/architecture.md)."""
from __future__ import annotations

import argparse
import math
import os
import re
import sys


def _cmd_info(args) -> int:
  from flexolmo_jax.config import load_model_config

  cfg = load_model_config(args.model, args.gin)
  if args.experts:
    cfg = cfg.replace(experts=tuple(args.experts.split(",")), top_k=args.top_k or cfg.top_k)
  print(cfg)
  print(f"parameters: {cfg.num_params():,} total, {cfg.active_params():,} active per token")
  return 0


def launch_lib_engines():
  from flexolmo_jax import launch

  return launch.ENGINES


def _cmd_launch(args) -> int:
  from flexolmo_jax import launch

  launch.launch(launch.job_from_args(args, args.run_args), dry_run=args.dry_run)
  return 0


def _cmd_demo(args) -> int:
  from flexolmo_jax import demo

  demo.run(args.workdir, quick=args.quick, fresh=args.fresh, seed=args.seed, jobs=args.jobs)
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


# ----------------------------------------------------------------------------- gin-driven runs

# CLI flag (argparse dest) -> the gin macro it sets in gin_configs/runs/<run>.gin.
TRAIN_FLAGS = {"steps": "STEPS", "batch_size": "BATCH_SIZE", "seq_len": "SEQ_LEN",
               "grad_accum": "GRAD_ACCUM", "lr": "LEARNING_RATE", "warmup": "WARMUP_STEPS",
               "checkpoint_every": "CHECKPOINT_EVERY", "log_every": "LOG_EVERY",
               "eval_every": "EVAL_EVERY", "seed": "SEED", "out": "OUTPUT_DIR", "data": "DATA",
               "vocabulary": "VOCABULARY"}
PRETRAIN_FLAGS = {**TRAIN_FLAGS, "eval_data": "EVAL_DATA"}
EXPERT_FLAGS = {**TRAIN_FLAGS, "public": "PUBLIC", "name": "NAME", "top_k": "TOP_K",
                "router_init": "ROUTER_INIT", "router_init_documents": "ROUTER_INIT_DOCUMENTS",
                "negative_bias": "NEGATIVE_BIAS", "dp": "DP", "target_epsilon": "TARGET_EPSILON",
                "delta": "DELTA", "clip": "CLIP", "noise_multiplier": "NOISE_MULTIPLIER",
                "dp_sampling": "DP_SAMPLING", "dp_accountant": "DP_ACCOUNTANT",
                "dp_microbatch": "DP_MICROBATCH", "dp_chunks": "DP_CHUNKS",
                "dp_router_init": "DP_ROUTER_INIT", "dp_router_noise": "DP_ROUTER_NOISE",
                "dp_router_proxy": "DP_ROUTER_PROXY"}
DENSE_FLAGS = {**TRAIN_FLAGS, "public": "PUBLIC", "name": "NAME"}
TUNE_FLAGS = {**{k: v for k, v in TRAIN_FLAGS.items() if k != "vocabulary"}, "merged": "MERGED",
              "proxy_fraction": "PROXY_FRACTION", "proxy_weight": "PROXY_WEIGHT",
              "expert_dropout": "EXPERT_DROPOUT"}
PREEMPTED_EXIT = 143


def gin_value(text: str) -> str:
  """A --gin.NAME=VALUE value as gin syntax: literals and @/% references as given, else a string."""
  import ast

  if text.startswith(("@", "%")):
    return text
  try:
    ast.literal_eval(text)
    return text
  except (ValueError, SyntaxError):
    return repr(text)


def split_gin_flags(argv):
  """Separates ``--gin.NAME=VALUE`` (gin bindings) from the ordinary flags."""
  rest, bindings = [], []
  for arg in argv:
    if arg.startswith("--gin."):
      name, sep, value = arg[len("--gin."):].partition("=")
      if not sep or not name:
        raise ValueError(f"{arg}: write --gin.NAME=VALUE.")
      bindings.append(f"{name} = {gin_value(value)}")
    else:
      rest.append(arg)
  return rest, bindings


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
                                             "generate", "extraction"})


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


def parse_run_config(run: str, args, flags: dict[str, str], model: str | None = None) -> None:
  """Parses model preset + runs/<run>.gin + --gin-file + flags + --gin. bindings (later wins)."""

  import gin

  from flexolmo_jax.config import GIN_DIR, model_gin_path
  from flexolmo_jax.train import expert, pretrain, router_tune  # noqa: F401  (configurables)

  files = ([model_gin_path(model)] if model else []) + [os.path.join(GIN_DIR, "runs", f"{run}.gin")]
  for path in args.gin_file:
    if not os.path.exists(path):
      raise FileNotFoundError(f"gin file {path} does not exist.")
    files.append(path)
  bindings = [f"{macro} = {getattr(args, dest)!r}" for dest, macro in flags.items()
              if getattr(args, dest, None) is not None]
  if getattr(args, "bf16", False):
    bindings.append("DTYPE = 'bfloat16'" if run == "train_expert"
                    else "flexolmo.ModelConfig.dtype = 'bfloat16'")
  defined = set()
  for path in files:
    with open(path) as fh:
      defined.update(re.findall(r"^\s*([A-Z][A-Z0-9_]*)\s*=", fh.read(), re.M))
  for binding in args.gin_bindings:
    name = binding.partition("=")[0].strip()
    if re.fullmatch(r"[A-Z][A-Z0-9_]*", name) and name not in defined:
      raise ValueError(f"--gin.{name}: no such setting in {run}.gin; its settings are "
                       f"{sorted(defined)}.")
  gin.clear_config()
  try:
    gin.parse_config_files_and_bindings(files, bindings + args.gin_bindings)
  except Exception as e:  # gin raises ValueError, KeyError, SyntaxError... name them all plainly
    required = re.search(r"(\w+)/macro\.value set to `%gin\.REQUIRED`", str(e))
    if required:
      flag = {macro: dest for dest, macro in flags.items()}.get(required.group(1))
      raise ValueError(f"missing required setting {required.group(1)}"
                       + (f" (--{flag.replace('_', '-')})" if flag else "") + ".") from None
    raise ValueError(f"gin configuration ({', '.join(files)}; bindings {args.gin_bindings}): "
                     f"{type(e).__name__}: {e}") from e


def _call_configured(fn):
  try:
    return fn()
  except RuntimeError as e:
    if "Required bindings" in str(e) or "gin.REQUIRED" in str(e):
      raise ValueError(f"missing required setting: {e}") from e
    raise


def _named_paths(items) -> dict[str, list[str]]:
  out: dict[str, list[str]] = {}
  for item in items or ():
    name, sep, path = item.partition("=")
    if not sep:
      raise ValueError(f"{item!r}: write NAME=PATH.")
    out.setdefault(name, []).append(path)
  return out


def _eval_domains(items, flexmix: str | None) -> dict[str, list[str]]:
  """``--data NAME=PATH``, or ``--data NAME`` for a domain of the FlexMix-mini at ``flexmix``."""
  named = [i for i in items or () if "=" in i]
  bare = [i for i in items or () if "=" not in i]
  out = _named_paths(named)
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


def _cmd_pretrain(args) -> int:
  from flexolmo_jax.train import pretrain

  args.eval_data = _named_paths(args.eval_data) if args.eval_data else None
  parse_run_config("pretrain", args, PRETRAIN_FLAGS, model=args.model)
  result, _ = _call_configured(pretrain.pretrain)
  return PREEMPTED_EXIT if result.preempted else 0


def _cmd_train_expert(args) -> int:
  from flexolmo_jax.train import expert

  parse_run_config("train_expert", args, EXPERT_FLAGS)
  result, _ = _call_configured(expert.train_expert)
  return PREEMPTED_EXIT if result.preempted else 0


def _cmd_merge(args) -> int:
  from flexolmo_jax.checkpoint import merge

  merge.merge(args.public, args.expert or [], args.out, exclude=args.exclude or [],
              top_k=args.top_k, top_k_policy=args.top_k_policy,
              negative_bias=not args.drop_negative_bias, overwrite=args.overwrite)
  return 0


def eval_batches(data: dict[str, list[str]], vocabulary, data_dir: str, seq_len: int,
                 batch_size: int) -> dict:
  """{domain: validation batches} of ``NAME=PATH`` data (raw paths or prepared datasets)."""
  from flexolmo_jax.data import tasks

  out = {}
  for name, paths in data.items():
    task = tasks.register_corpus(name, paths, data_dir=data_dir, vocabulary=vocabulary,
                                 require=("validation",))
    out[name] = tasks.lm_batches(task, seq_len=seq_len, batch_size=batch_size,
                                 split="validation", shuffle=False, num_epochs=1,
                                 drop_remainder=False)
  return out


def model_vocabulary(path: str):
  """The vocabulary a saved model (any kind) was trained with."""

  from flexolmo_jax.checkpoint import merge, store
  from flexolmo_jax.data import tasks
  from flexolmo_jax.train import expert

  path = store.saved_dir(path)
  manifest = store.read_manifest(path)
  if manifest["kind"] == "btm":
    return model_vocabulary(manifest["members"][0]["path"])
  if manifest["kind"] == "merged":
    path = os.path.join(path, merge.PUBLIC_DIR)
  return tasks.vocabulary_from_spec(expert.public_vocabulary(path, manifest))


def _cmd_eval(args) -> int:
  """Per-domain losses (data-parallel over processes: each scores its shard of the stream)
  and multiple-choice accuracy (every process scores every question); process 0 alone prints
  and writes ``--json``."""
  import contextlib
  import io

  from flexolmo_jax import distributed

  with contextlib.redirect_stdout(sys.stdout if distributed.is_leader() else io.StringIO()):
    return _eval(args, write=distributed.is_leader())


def _eval(args, write: bool) -> int:
  import json

  from flexolmo_jax.eval import perplexity, scoring

  data, tasks_mc = _eval_domains(args.data, args.flexmix), _named_paths(args.mc)
  if not data and not tasks_mc:
    raise ValueError("eval needs at least one --data NAME=PATH or --mc NAME=FILE.jsonl.")
  vocab = model_vocabulary(args.model)
  report: dict = {}
  print_privacy(args.model)
  if data:
    batches = eval_batches(data, vocab, args.data_dir, args.seq_len, args.batch_size)
    stats = perplexity.evaluate_stats(args.model, batches, args.experts, args.exclude,
                                      max_batches=args.max_batches, vocab=vocab)
    print(f"{'domain':>10}  {'loss':>8}  {'ppl':>9}  {'bits/byte':>9}")
    for name, s in stats.items():
      bpb = f"{s['bits_per_byte']:.4f}" if s["bits_per_byte"] is not None else "-"
      print(f"{name:>10}  {s['loss']:8.4f}  {s['perplexity']:9.3f}  {bpb:>9}")
    average = sum(s["loss"] for s in stats.values()) / len(stats)
    print(f"{'average':>10}  {average:8.4f}")
    report.update(stats)
  if tasks_mc:
    cfg, params, _ = perplexity.load_model(args.model, args.experts, args.exclude)
    scorer = scoring.Scorer(cfg, params, batch_size=args.batch_size)
    for name, paths in tasks_mc.items():
      questions = [q for path in paths for q in scoring.read_multiple_choice(path)]
      result = scoring.multiple_choice(scorer, vocab, questions)
      print(f"{name:>10}  acc {result['acc']:.4f}  acc_norm {result['acc_norm']:.4f}  "
            f"({result['questions']} questions)")
      report[name] = result
  if args.json and write:
    with open(args.json, "w") as fh:
      json.dump(report, fh, indent=2)
  return 0


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


def _cmd_train_dense(args) -> int:
  from flexolmo_jax.train import pretrain

  parse_run_config("train_dense", args, DENSE_FLAGS)
  result, _ = _call_configured(pretrain.pretrain)
  return PREEMPTED_EXIT if result.preempted else 0


def _cmd_soup(args) -> int:
  from flexolmo_jax.eval import baselines

  print(f"model soup -> {baselines.soup(args.dense, args.out, overwrite=args.overwrite)}")
  return 0


def _cmd_btm(args) -> int:
  from flexolmo_jax.eval import baselines

  out = baselines.btm(args.dense, args.out, tau=args.tau, top_k=args.top_k,
                      overwrite=args.overwrite)
  print(f"BTM ensemble -> {out}")
  return 0


def _cmd_btx(args) -> int:
  from flexolmo_jax.eval import baselines

  out = baselines.btx(args.public, args.dense, args.out, top_k=args.top_k, seed=args.seed,
                      overwrite=args.overwrite)
  print(f"BTX-lite merge (router untrained) -> {out}\n"
        f"next: flexolmo tune-router --merged {out} --proxy-weight 0 --data PUBLIC_DATA --out RUN")
  return 0


def _cmd_generate(args) -> int:
  from flexolmo_jax.eval import generate, perplexity

  cfg, params, _ = perplexity.load_model(args.model, args.experts, args.exclude)
  vocab = model_vocabulary(args.model)
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


def _cmd_extraction(args) -> int:
  """The extraction evaluation (docs/method.md §9) of any saved model on an owner's documents."""
  import dataclasses
  import json

  import numpy as np

  from flexolmo_jax.data import sources
  from flexolmo_jax.eval import extraction, perplexity

  config = extraction.ExtractionConfig(
      prefix=args.prefix, total=args.total, samples=args.samples, threshold=args.threshold,
      min_length=args.min_length, top_k=args.top_k, top_p=args.top_p,
      temperature=args.temperature, seed=args.seed)
  if not 0 < config.prefix < config.total:
    raise ValueError(f"--prefix {config.prefix} must be above 0 and below --total {config.total}.")
  if config.min_length < config.prefix + 1:
    raise ValueError(f"--min-length {config.min_length} leaves nothing to continue after the "
                     f"{config.prefix}-token prefix.")
  spec = sources.SourceSpec(tuple(args.documents), field=args.field,
                            validation_fraction=args.validation_fraction)
  vocab = model_vocabulary(args.model)
  read = 0
  tested = []                     # (where, token ids) of each document long enough to test
  for doc in sources.iter_documents(spec):
    if args.split == "train" and sources.split_of(doc.text, spec.validation_fraction) != "train":
      continue
    read += 1
    ids = list(vocab.encode(doc.text))
    if len(ids) >= config.min_length:
      tested.append((doc.key, ids))
  paths = ", ".join(spec.paths)
  if not tested:
    split = " (train split)" if args.split == "train" else ""
    raise sources.DataError(f"{paths}: none of the {read} documents read{split} has "
                            f"--min-length {config.min_length} tokens to test extraction on.")
  if args.max_documents and len(tested) > args.max_documents:
    keep = np.random.default_rng(config.seed).choice(len(tested), args.max_documents,
                                                     replace=False)
    tested = [tested[i] for i in sorted(keep)]
  cfg, params, _ = perplexity.load_model(args.model, args.experts, args.exclude)
  if config.total > cfg.max_seq_len:
    raise ValueError(f"--total {config.total} is longer than the model's max_seq_len "
                     f"{cfg.max_seq_len}.")
  print(f"extraction: {len(tested)} of the {read} documents read in {paths} (at least "
        f"{config.min_length} tokens), {config.samples} samples each of {config.total} tokens "
        f"after a {config.prefix}-token prefix", flush=True)
  docs = [ids for _, ids in tested]
  result = extraction.extraction(
      cfg, params, docs, config, eos_id=vocab.eos_id,
      progress=lambda done, total: print(f"  {done}/{total} documents", flush=True))
  result["loss"] = extraction.document_loss(cfg, params, docs, config.total)
  result["per_document"] = [{"document": where, "best_similarity": best}
                            for (where, _), best in zip(tested, result["per_document"])]
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


def _cmd_export_hf(args) -> int:
  from flexolmo_jax.convert import export

  export.export_hf(args.model, args.out, experts=args.experts, exclude=args.exclude,
                   dtype=args.dtype, shard_size=args.shard_size,
                   drop_negative_bias=args.drop_negative_bias, overwrite=args.overwrite)
  return 0


def _cmd_import_hf(args) -> int:
  from flexolmo_jax.convert import importer

  names = [n for n in (args.names or "").split(",") if n]
  importer.import_hf(args.hf, args.out, names=names or None, split=args.split,
                     vocabulary=args.vocabulary, overwrite=args.overwrite)
  return 0


def _cmd_tune_router(args) -> int:
  from flexolmo_jax.train import router_tune

  parse_run_config("tune_router", args, TUNE_FLAGS)
  result, _ = _call_configured(router_tune.tune_router)
  return PREEMPTED_EXIT if result.preempted else 0


def number(text: str) -> float:
  """An argparse type: a finite number."""
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
  if not math.isfinite(value):
    raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
  return value


def _integer(text: str, least: int) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
  if value < least:
    raise argparse.ArgumentTypeError(f"{value} is below {least}")
  return value


def natural(text: str) -> int:
  """An argparse type: an integer >= 0."""
  return _integer(text, 0)


def count(text: str) -> int:
  """An argparse type: an integer >= 1."""
  return _integer(text, 1)


class Parser(argparse.ArgumentParser):
  """argparse with errors on one line (the usage is one ``--help`` away)."""

  def error(self, message: str):
    self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_train_flags(p: argparse.ArgumentParser) -> None:
  p.add_argument("--data", action="append", help="file or directory of text (repeat)")
  p.add_argument("--out", help="output (run) directory; re-running resumes it")
  p.add_argument("--vocabulary", help="'byte' or a SentencePiece .model file")
  p.add_argument("--steps", type=count)
  p.add_argument("--batch-size", type=count, help="global sequences per step")
  p.add_argument("--seq-len", type=count)
  p.add_argument("--grad-accum", type=count, help="micro-batches per step")
  p.add_argument("--lr", type=number)
  p.add_argument("--warmup", type=natural, help="warm-up steps")
  p.add_argument("--checkpoint-every", type=count)
  p.add_argument("--log-every", type=count)
  p.add_argument("--eval-every", type=natural)
  p.add_argument("--seed", type=natural)
  p.add_argument("--bf16", action="store_true", help="bfloat16 compute (parameters stay fp32)")
  p.add_argument("--gin-file", action="append", default=[], help="extra gin file (repeat)")
  p.epilog = "Any gin binding: --gin.NAME=VALUE (e.g. --gin.STEPS=500)."


def _add_selection_flags(p: argparse.ArgumentParser) -> None:
  group = p.add_mutually_exclusive_group()
  group.add_argument("--experts", help="opt in only these experts of a merged model: a,b,c")
  group.add_argument("--exclude", help="opt these experts of a merged model out: x,y")


def build_parser() -> argparse.ArgumentParser:
  p = Parser(
      prog="flexolmo", description=__doc__,
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
  info = sub.add_parser("info", help="print a model preset and its parameter counts")
  info.add_argument("--model", default="tiny", help="preset name (gin_configs/models) or gin file")
  info.add_argument("--gin", action="append", default=[], help="extra gin binding")
  info.add_argument("--experts", default="", help="comma-separated expert names (MoE)")
  info.add_argument("--top-k", type=natural, default=0)
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
  prep.add_argument("--validation-fraction", type=number, default=0.05)
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
  ins.add_argument("--examples", type=natural, default=3)
  ins.set_defaults(fn=_cmd_data_inspect)
  pre = sub.add_parser("pretrain", help="train the dense public model (gin: runs/pretrain.gin)")
  pre.add_argument("--model", default="tiny", help="model preset (gin_configs/models) or gin file")
  pre.add_argument("--eval-data", action="append", help="NAME=PATH validation domain (repeat)")
  _add_train_flags(pre)
  pre.set_defaults(fn=_cmd_pretrain)
  exp = sub.add_parser("train-expert",
                       help="train one owner's expert against the frozen public model")
  exp.add_argument("--public", help="public model directory (or pretrain run directory)")
  exp.add_argument("--name", help="the expert's name ('public' is reserved)")
  exp.add_argument("--top-k", type=count, help="1 or 2 (default 2 of 2)")
  exp.add_argument("--router-init", choices=["shared", "per_layer", "random"])
  exp.add_argument("--router-init-documents", type=count)
  exp.add_argument("--no-negative-bias", dest="negative_bias", action="store_const", const=False)
  dp = exp.add_argument_group("differential privacy (DP-SGD; see flexolmo_jax/privacy)")
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
  _add_train_flags(exp)
  exp.set_defaults(fn=_cmd_train_expert)
  mrg = sub.add_parser("merge", help="merge the public model and expert artifacts into one MoE")
  mrg.add_argument("--public", required=True,
                   help="public model (or pretrain run) directory, or a merged checkpoint")
  mrg.add_argument("--expert", action="append", help="expert artifact or run directory (repeat)")
  mrg.add_argument("--exclude", action="append", help="leave this expert out for good (repeat)")
  mrg.add_argument("--out", required=True)
  mrg.add_argument("--top-k", type=count, help="active experts per token (default min(4, E))")
  mrg.add_argument("--top-k-policy", default="clamp", choices=["clamp", "reject"],
                   help="when fewer than top-k experts are opted in at inference")
  mrg.add_argument("--drop-negative-bias", action="store_true",
                   help="drop the experts' negative biases (the reference and HF layout)")
  mrg.add_argument("--overwrite", action="store_true")
  mrg.set_defaults(fn=_cmd_merge)
  dense = sub.add_parser("train-dense", help="baseline: the public model continued on one domain")
  dense.add_argument("--public", help="public model directory (or pretrain run directory)")
  dense.add_argument("--name", help="the domain's name")
  _add_train_flags(dense)
  dense.set_defaults(fn=_cmd_train_dense)
  for command, fn, text in (("soup", _cmd_soup, "baseline: uniform average of dense models"),
                            ("btm", _cmd_btm, "baseline: BTM per-token ensemble of dense models")):
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
  bx.set_defaults(fn=_cmd_btx)
  tune = sub.add_parser("tune-router",
                        help="tune the router rows of a merged model on public proxy data")
  tune.add_argument("--merged", help="merged checkpoint directory")
  tune.add_argument("--proxy-fraction", type=number)
  tune.add_argument("--proxy-weight", type=number)
  tune.add_argument("--expert-dropout", type=number,
                    help="chance each training sequence leaves each non-public expert out, so "
                         "the router learns to do without any owner (default 0, as the paper)")
  _add_train_flags(tune)
  tune.set_defaults(fn=_cmd_tune_router)
  gen = sub.add_parser("generate", help="continue prompts with any saved model (KV cache)")
  gen.add_argument("--model", required=True, help="public, dense or merged model directory")
  _add_selection_flags(gen)
  gen.add_argument("--prompt", action="append", required=True, help="text to continue (repeat)")
  gen.add_argument("--max-new-tokens", type=count, default=64)
  gen.add_argument("--temperature", type=number, default=0.0, help="0 is greedy")
  gen.add_argument("--top-k", type=count)
  gen.add_argument("--top-p", type=number)
  gen.add_argument("--seed", type=natural, default=0)
  gen.add_argument("--num-samples", type=count, default=1)
  gen.set_defaults(fn=_cmd_generate)
  ext = sub.add_parser("extraction", help="training-data extraction (docs/method.md §9) of any "
                       "saved model on an owner's documents")
  ext.add_argument("--model", required=True, help="public, dense or merged model directory")
  _add_selection_flags(ext)
  ext.add_argument("--documents", action="append", required=True,
                   help="the owner's files or directories, text or JSONL as `data prepare` "
                        "reads them, e.g. with planted canaries (repeat)")
  ext.add_argument("--field", default="text", help="the text field of JSONL records")
  ext.add_argument("--split", choices=["all", "train"], default="all",
                   help="train: only the documents `data prepare` puts in the train split")
  ext.add_argument("--validation-fraction", type=number, default=0.05,
                   help="the split's fraction, as the data was prepared (with --split train)")
  ext.add_argument("--max-documents", type=count, help="test this many, drawn with --seed")
  ext.add_argument("--prefix", type=count, default=32)
  ext.add_argument("--total", type=count, default=256, help="span length, prefix included")
  ext.add_argument("--min-length", type=count, default=128, help="shorter documents are skipped")
  ext.add_argument("--samples", type=count, default=10)
  ext.add_argument("--threshold", type=number, default=0.9,
                   help="normalized Levenshtein similarity that counts as extracted")
  ext.add_argument("--top-k", type=count, default=50)
  ext.add_argument("--top-p", type=number, default=0.95)
  ext.add_argument("--temperature", type=number, default=1.0)
  ext.add_argument("--seed", type=natural, default=0)
  ext.add_argument("--json", help="write every number (and each document's similarity) here")
  ext.set_defaults(fn=_cmd_extraction)
  exh = sub.add_parser("export-hf", help="a merged (FlexOlmo) or dense (OLMo-2) model -> a "
                       "Hugging Face checkpoint")
  exh.add_argument("--model", required=True, help="merged, public or dense model directory")
  _add_selection_flags(exh)
  exh.add_argument("--out", required=True)
  exh.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
  exh.add_argument("--shard-size", default="5GB", help="largest safetensors file (e.g. 5GB)")
  exh.add_argument("--drop-negative-bias", action="store_true",
                   help="export a model whose experts carry a negative router bias without it")
  exh.add_argument("--overwrite", action="store_true")
  exh.set_defaults(fn=_cmd_export_hf)
  imh = sub.add_parser("import-hf", help="a Hugging Face OLMo-2 or FlexOlmo checkpoint -> a "
                       "public model or a merged checkpoint")
  imh.add_argument("--hf", required=True, help="Hugging Face model directory")
  imh.add_argument("--out", required=True)
  imh.add_argument("--names", help="names of experts 1..n-1 of a FlexOlmo model: a,b,c")
  imh.add_argument("--split", action="store_true", help="also keep the public model and each "
                   "expert artifact: OUT/public, OUT/experts/NAME, OUT/merged")
  imh.add_argument("--vocabulary", help="'byte' or a SentencePiece .model (default: from the "
                   "tokenizer files)")
  imh.add_argument("--overwrite", action="store_true")
  imh.set_defaults(fn=_cmd_import_hf)
  ev = sub.add_parser("eval", help="validation loss per domain of any saved model")
  ev.add_argument("--model", required=True, help="public, dense, merged or btm directory")
  _add_selection_flags(ev)
  ev.add_argument("--data", action="append",
                  help="NAME=PATH validation domain, or NAME of a --flexmix domain (repeat)")
  ev.add_argument("--flexmix", help="a FlexMix-mini directory whose domains --data NAME names")
  ev.add_argument("--mc", action="append",
                  help="NAME=FILE.jsonl multiple-choice task: {context, choices, answer} lines")
  ev.add_argument("--data-dir", default="data/eval", help="where raw paths are prepared")
  ev.add_argument("--seq-len", type=count, default=256)
  ev.add_argument("--batch-size", type=count, default=16)
  ev.add_argument("--max-batches", type=count)
  ev.add_argument("--json", help="write every number here")
  ev.set_defaults(fn=_cmd_eval)
  la = sub.add_parser(
      "launch", help="fill a launch/ template (SLURM, JobSet, xpk, local) for one run",
      description="flexolmo launch ENGINE --run RUN [options] [--dry-run] -- RUN'S OWN FLAGS "
                  "(e.g. -- --gin-file my_experiment.gin --out gs://bucket/run)")
  la.add_argument("engine", choices=launch_lib_engines())
  la.add_argument("--run", required=True, help="the flexolmo sub-command the job runs")
  la.add_argument("--nodes", type=count, default=1)
  la.add_argument("--procs-per-node", type=count, default=1,
                  help="1: one process drives every device of its node; or one per GPU")
  la.add_argument("--gpus-per-node", type=natural, default=0)
  la.add_argument("--name", help="job name (default flexolmo-RUN)")
  la.add_argument("--image", default="flexolmo-jax:latest", help="container image (k8s, xpk)")
  la.add_argument("--executable", default="flexolmo", help="how the job starts the CLI")
  la.add_argument("--time", default="24:00:00", help="SLURM time limit")
  la.add_argument("--partition", help="SLURM partition")
  la.add_argument("--workdir", default=".", help="directory the SLURM job runs in")
  la.add_argument("--service-account", default="default", help="Kubernetes service account")
  la.add_argument("--cluster", default="CLUSTER", help="xpk cluster")
  la.add_argument("--tpu-type", help="xpk on TPU, e.g. v5p-256")
  la.add_argument("--device-type", default="h100-80gb-8", help="xpk on GPU")
  la.add_argument("--dry-run", action="store_true", help="print the filled job, submit nothing")
  la.set_defaults(fn=_cmd_launch)
  demo = sub.add_parser("demo", help="the end-to-end demo on FlexMix-mini")
  demo.add_argument("--workdir", default="workdir")
  demo.add_argument("--quick", action="store_true", help="small sizes (for tests)")
  demo.add_argument("--fresh", action="store_true", help="delete the workdir, rebuild every stage")
  demo.add_argument("--seed", type=natural, default=0,
                    help="seed of every training stage (a finished stage is reused whatever it was)")
  demo.add_argument("--jobs", type=count, default=2,
                    help="training processes at once for the independent experts and dense "
                         "models (each process still holds one owner's data only)")
  demo.set_defaults(fn=_cmd_demo)
  return p


# Flags that name local files or directories; made absolute once, before any command runs.
PATH_FLAGS = ("out", "public", "expert", "hf", "documents", "dense", "merged", "flexmix", "json",
              "path", "data_dir", "workdir", "gin_file", "dp_router_proxy")
NAMED_PATH_FLAGS = ("eval_data", "mc")   # NAME=PATH


def absolute_paths(args) -> None:
  """Every path flag of ``args`` made absolute (:mod:`flexolmo_jax.paths`), in place."""
  from flexolmo_jax import paths

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
  model = getattr(args, "model", None)   # a saved model, or (pretrain, info) a preset name
  if model is not None and (args.command not in ("pretrain", "info") or os.path.exists(model)):
    args.model = paths.absolute(model)


def main(argv=None) -> int:
  from flexolmo_jax import console

  from_command_line = argv is None
  argv = sys.argv[1:] if argv is None else list(argv)
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
    from flexolmo_jax import distributed

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


if __name__ == "__main__":
  sys.exit(main())
