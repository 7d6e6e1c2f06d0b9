"""Training telemetry: model FLOPs, the machine's matmul peak, and where metrics are written.

Every ``log_every`` steps one record goes to ``metrics.jsonl`` (a line of JSON), TensorBoard
event files under ``tb/``, and the console: a one-line progress bar on a terminal, plain lines
otherwise (log files stay readable).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from flexolmo_jax import console
from flexolmo_jax.config import ModelConfig


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token, the usual 6N + attention convention (PaLM appendix B).

  N counts the *active* non-embedding parameters (top-k experts, the lm_head included); the
  attention term is 12 * layers * heads * head_dim * seq_len. Expert training does less work
  than this (no weight gradients for the frozen model) but is reported on the same scale.
  """
  n = cfg.active_params() - cfg.vocab_size * cfg.d_model
  return 6.0 * n + attention_flops_per_token(cfg, seq_len)


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """The attention term of :func:`flops_per_token`: scores and values, forward and backward."""
  return 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


def measure_matmul_peak(dtype: str = "float32", size: int = 1024, repeats: int = 5) -> float:
  """FLOP/s of a square matmul on the default device (the best of ``repeats``)."""
  if jax.default_backend() != "cpu":
    size = 8192
  x = jnp.ones((size, size), dtype)
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(x).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * size**3 / best


class MetricsWriter:
  """JSONL + TensorBoard + console, written by process 0 only."""

  def __init__(self, workdir: str, total_steps: int, resume_step: int = 0):
    self.enabled = jax.process_index() == 0
    self.total = total_steps
    self.tty = console.stderr_is_tty()
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._truncate_after(resume_step)
    self._fh = open(self.path, "a")
    try:
      import tensorflow as tf

      self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tb"))
    except Exception as e:  # pylint: disable=broad-except
      print(f"TensorBoard events disabled: {e}", file=sys.stderr)

  def _truncate_after(self, step: int) -> None:
    """On resume, drops records of steps after the restored checkpoint (they are redone). A torn
    last line (a write cut short: a full disk, a kill) is dropped with a warning; a bad line
    anywhere else is an error naming the file and line."""
    if not os.path.exists(self.path):
      return
    with open(self.path, encoding="utf-8", errors="replace") as fh:
      lines = fh.readlines()
    kept = []
    for number, line in enumerate(lines, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        if not isinstance(record, dict) or not isinstance(record.get("step", 0), int):
          raise ValueError("not a metrics record")
      except ValueError as e:
        if number == len(lines):
          print(f"{self.path}:{number}: dropping a torn last record ({e}); it is written "
                "again.", file=sys.stderr)
          continue
        raise ValueError(f"{self.path}:{number}: not a metrics record ({e}); fix or remove "
                         "the line to resume.") from None
      if record.get("step", 0) <= step:
        kept.append(line if line.endswith("\n") else line + "\n")
    with open(self.path + ".tmp", "w") as fh:
      fh.writelines(kept)
    os.replace(self.path + ".tmp", self.path)

  def write(self, step: int, record: Mapping[str, float], kind: str = "train") -> None:
    if not self.enabled:
      return
    line = {"step": step, "kind": kind, **{k: _plain(v) for k, v in record.items()}}
    self._fh.write(json.dumps(line) + "\n")
    self._fh.flush()
    if self._tb is not None:
      import tensorflow as tf

      with self._tb.as_default(step=step):
        for key, value in line.items():
          if isinstance(value, (int, float)) and key != "step":
            tf.summary.scalar(f"{kind}/{key}", value)
          elif isinstance(value, dict):
            for name, v in value.items():
              tf.summary.scalar(f"{kind}/{key}/{name}", v)
      self._tb.flush()
    self.console(step, line)

  def console(self, step: int, line: Mapping) -> None:
    parts = [f"{k}={_short(v)}" for k, v in line.items() if k not in ("step", "kind")]
    text = f"[{line['kind']} {step}/{self.total}] " + " ".join(parts)
    if self.tty and line["kind"] == "train":
      width = 20
      done = int(width * step / max(self.total, 1))
      print(f"\r[{'#' * done}{'.' * (width - done)}] {text}"[:200], end="", file=sys.stderr,
            flush=True)
    else:
      if self.tty:
        print(file=sys.stderr)
      print(text, file=sys.stderr, flush=True)

  def close(self) -> None:
    if self.enabled:
      if self.tty:
        print(file=sys.stderr)
      self._fh.close()
      if self._tb is not None:
        self._tb.close()


def train_record(host_metrics, expert_names=()) -> dict:
  """The logged steps' mean loss and the last step's learning rate, gradient norm and z-loss;
  with experts, the router z-loss and each expert's mean share of the routing."""
  last = host_metrics[-1]
  rec = {"loss": float(np.mean([x["loss"] for x in host_metrics])),
         "lr": float(last["lr"]), "grad_norm": float(last["grad_norm"]),
         "lm_z_loss": float(last["lm_z_loss"])}
  if expert_names:
    share = np.mean([x["expert_share"] for x in host_metrics], axis=0)
    rec["router_z_loss"] = float(last["router_z_loss"])
    rec["expert_share"] = {n: float(s) for n, s in zip(expert_names, share)}
  return rec


def _plain(value):
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  if hasattr(value, "item"):
    return value.item()
  return value


def _short(value) -> str:
  if isinstance(value, float):
    return f"{value:.4g}"
  if isinstance(value, dict):
    return "{" + ",".join(f"{k}:{_short(v)}" for k, v in value.items()) + "}"
  return str(value)
