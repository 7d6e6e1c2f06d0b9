"""The loop's view of a registered Task: a resumable training stream and finite eval streams."""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import jax

from flexolmo_jax.data import sources, tasks


def host_batch_size(global_batch: int) -> int:
  if global_batch % jax.process_count():
    raise ValueError(f"batch_size={global_batch} is not divisible by the "
                     f"{jax.process_count()} hosts.")
  return global_batch // jax.process_count()


def train_stream(task: str, cfg) -> Callable[[int], Iterator]:
  """``start -> iterator`` over the repeating, shuffled stream from batch ``start`` on."""
  def make(start: int):
    return tasks.lm_batches(task, seq_len=cfg.seq_len, batch_size=host_batch_size(cfg.batch_size),
                            seed=cfg.seed, start_step=start)
  return make


def eval_stream(task: str, cfg, split: str = "validation") -> Callable[[], Iterator]:
  """One unshuffled pass over ``split`` (the last batch may be short; the loop pads it)."""
  def make():
    return tasks.lm_batches(task, seq_len=cfg.seq_len, batch_size=host_batch_size(cfg.batch_size),
                            split=split, shuffle=False, num_epochs=1, drop_remainder=False)
  return make


def data_card(domain: str, data, result, train, **extra) -> dict:
  """What a saved model says about the data it saw: source names (never locations), counts,
  steps, settings and validation losses."""
  return {"domain": domain, "sources": [sources.source_label(p) for p in data],
          "steps": result.step, "tokens_seen": result.tokens_seen,
          "documents_seen": result.documents_seen, "validation_loss": result.eval_losses,
          "train_config": dataclasses.asdict(train), **extra}
