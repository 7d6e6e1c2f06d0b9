"""Gin-configured runs: the training commands' flags are gin macros of
``gin_configs/runs/<run>.gin``, read with the model preset, ``--gin-file`` files and
``--gin.NAME=VALUE`` bindings (later wins)."""
from __future__ import annotations

import ast
import os
import re

# CLI flag (argparse dest) -> the gin macro it sets in gin_configs/runs/<run>.gin.
TRAIN_FLAGS = {"steps": "STEPS", "batch_size": "BATCH_SIZE", "seq_len": "SEQ_LEN",
               "grad_accum": "GRAD_ACCUM", "lr": "LEARNING_RATE", "warmup": "WARMUP_STEPS",
               "checkpoint_every": "CHECKPOINT_EVERY", "log_every": "LOG_EVERY",
               "eval_every": "EVAL_EVERY", "seed": "SEED", "out": "OUTPUT_DIR", "data": "DATA",
               "vocabulary": "VOCABULARY"}
PRETRAIN_FLAGS = {**TRAIN_FLAGS, "eval_data": "EVAL_DATA"}
EXPERT_FLAGS = {**TRAIN_FLAGS, "public": "PUBLIC", "name": "NAME", "top_k": "TOP_K",
                "router_init": "ROUTER_INIT", "router_init_documents": "ROUTER_INIT_DOCUMENTS",
                "router_public_odds": "ROUTER_PUBLIC_ODDS", "router_lr_scale": "ROUTER_LR_SCALE",
                "negative_bias": "NEGATIVE_BIAS", "anchor_dtype": "ANCHOR_DTYPE", "dp": "DP", "target_epsilon": "TARGET_EPSILON",
                "delta": "DELTA", "clip": "CLIP", "noise_multiplier": "NOISE_MULTIPLIER",
                "dp_sampling": "DP_SAMPLING", "dp_accountant": "DP_ACCOUNTANT",
                "dp_microbatch": "DP_MICROBATCH", "dp_chunks": "DP_CHUNKS",
                "dp_router_init": "DP_ROUTER_INIT", "dp_router_noise": "DP_ROUTER_NOISE",
                "dp_router_proxy": "DP_ROUTER_PROXY"}
DENSE_FLAGS = {**TRAIN_FLAGS, "public": "PUBLIC", "name": "NAME"}
TUNE_FLAGS = {**{k: v for k, v in TRAIN_FLAGS.items() if k != "vocabulary"}, "merged": "MERGED",
              "proxy_fraction": "PROXY_FRACTION", "proxy_weight": "PROXY_WEIGHT",
              "expert_dropout": "EXPERT_DROPOUT", "interpolation": "INTERPOLATION"}
def gin_value(text: str) -> str:
  """A --gin.NAME=VALUE value as gin syntax: literals and @/% references as given, else a string."""
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


def parse_run_config(run: str, args, flags: dict[str, str], model: str | None = None) -> None:
  """Parses model preset + runs/<run>.gin + --gin-file + flags + --gin. bindings (later wins)."""
  import gin

  from flexolmo_jax.config import GIN_DIR, model_gin_path

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


def call_configured(fn):
  """Calls a gin-configured function; a missing required setting is bad input, not a crash."""
  try:
    return fn()
  except RuntimeError as e:
    if "Required bindings" in str(e) or "gin.REQUIRED" in str(e):
      raise ValueError(f"missing required setting: {e}") from e
    raise
