"""The loop's view of a registered Task: a resumable training stream and finite eval streams."""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import jax
import numpy as np

from flexolmo_jax.data import sources, tasks


def host_batch_size(global_batch: int) -> int:
  if global_batch % jax.process_count():
    raise ValueError(f"batch_size={global_batch} is not divisible by the "
                     f"{jax.process_count()} hosts.")
  return global_batch // jax.process_count()


def data_shards(cfg) -> int:
  """How many shards the training stream is read as: ``cfg.data_shards``, or one per host."""
  shards = cfg.data_shards or jax.process_count()
  if shards % jax.process_count():
    raise ValueError(f"TrainConfig: data_shards={shards} is not a multiple of the "
                     f"{jax.process_count()} hosts.")
  if cfg.batch_size % shards:
    raise ValueError(f"TrainConfig: batch_size={cfg.batch_size} is not divisible by "
                     f"data_shards={shards}.")
  return shards


def train_stream(task: str, cfg) -> Callable[[int], Iterator]:
  """``start -> iterator`` over the repeating, shuffled stream from batch ``start`` on.

  The stream is read as ``data_shards(cfg)`` shards (seqio ``ShardInfo``), each giving
  ``batch_size / shards`` rows of every global batch; this host reads its contiguous range of
  them and stacks their rows. A fixed ``data_shards`` therefore gives the same global batches on
  any number of hosts that divides it (the multi-host test compares 2 processes with 1)."""
  shards = data_shards(cfg)
  per_host = shards // jax.process_count()
  first = jax.process_index() * per_host

  def make(start: int):
    streams = [tasks.lm_batches(task, seq_len=cfg.seq_len, batch_size=cfg.batch_size // shards,
                                seed=cfg.seed, start_step=start, shard_index=first + i,
                                num_shards=shards) for i in range(per_host)]
    if per_host == 1:
      return streams[0]
    return ({k: np.concatenate([b[k] for b in parts]) for k in parts[0]}
            for parts in zip(*streams))
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
