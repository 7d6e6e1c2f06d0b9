"""What runs between training steps: hooks, and the per-step metrics log.

A :class:`Hook` is a function of the step number called every ``every`` steps (and after the
last one); the trainer's own evaluation and checkpointing are hooks, and ``Trainer.add_hook``
adds more. :class:`StepLog` keeps each step's device metrics until a record is written, so the
host waits on the device only when it logs.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax


@dataclasses.dataclass(frozen=True)
class Hook:
  fn: Callable[[int], None]
  every: int
  at_last: bool = True          # also after the run's last step

  def due(self, step: int, last: int) -> bool:
    return step % self.every == 0 or (self.at_last and step == last)


class StepLog:
  """Each step's metrics, written as one record every ``log_every`` steps (and after the last).

  ``record(host_metrics, seconds, compile_s) -> dict`` makes a record of the steps since the
  last one. The first step a process runs compiles: its time is reported as ``compile_s``, and a
  fresh run logs it alone. A resumed run continues the saved ``window`` of steps not logged yet,
  so its records equal an uninterrupted run's."""

  def __init__(self, writer, record: Callable, log_every: int, last: int, window=()):
    self.writer, self.record, self.log_every, self.last = writer, record, log_every, last
    self.window = list(window)
    self.compile_s = self.t_window = None

  def add(self, step: int, metrics, started: float) -> None:
    self.window.append(metrics)
    first = self.compile_s is None
    if first:
      jax.block_until_ready(metrics)
      self.compile_s = time.perf_counter() - started
      self.t_window = time.perf_counter()
    if first and step == 1:
      self.writer.write(step, self.record(self.window, None, self.compile_s))
      self.window = []
    elif step % self.log_every == 0 or step == self.last:
      jax.block_until_ready(metrics)
      now = time.perf_counter()
      self.writer.write(step, self.record(jax.device_get(self.window), now - self.t_window, None))
      self.t_window, self.window = now, []
