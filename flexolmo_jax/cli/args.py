"""Argument types and the flags several sub-commands share."""
from __future__ import annotations

import argparse
import math


class Parser(argparse.ArgumentParser):
  """argparse with errors on one line (the usage is one ``--help`` away)."""

  def error(self, message: str):
    self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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


def add_train_flags(p: argparse.ArgumentParser) -> None:
  """The flags of every training run (each sets a gin macro, cli/run_config.py)."""
  p.add_argument("--data", action="append", help="file or directory of text (repeat)")
  p.add_argument("--out", help="output (run) directory; re-running resumes it")
  p.add_argument("--vocabulary", help="'byte', a SentencePiece .model file or a Hugging Face "
                 "tokenizer.json (its special tokens from the tokenizer_config.json beside it)")
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


def add_selection_flags(p: argparse.ArgumentParser) -> None:
  """Opt experts of a merged model in or out at inference."""
  group = p.add_mutually_exclusive_group()
  group.add_argument("--experts", help="opt in only these experts of a merged model: a,b,c")
  group.add_argument("--exclude", help="opt these experts of a merged model out: x,y")


def named_paths(items) -> dict[str, list[str]]:
  """``NAME=PATH`` flags (repeated) -> {name: [paths]}."""
  out: dict[str, list[str]] = {}
  for item in items or ():
    name, sep, path = item.partition("=")
    if not sep:
      raise ValueError(f"{item!r}: write NAME=PATH.")
    out.setdefault(name, []).append(path)
  return out
