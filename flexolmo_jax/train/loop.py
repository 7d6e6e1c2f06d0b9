"""The training loop every trainer uses: one jitted step under the mesh, metrics, checkpoints, resume.

A trainer supplies ``apply(params, frozen, batch) -> (logits, ModelAux)`` plus the initial
*trainable* tree ``params`` and the *frozen* tree (empty for pre-training, the public model for
expert training). Gradients, optimizer state and updates exist for ``params`` only.

The jitted step is train/programs.py's; the objective and how it is differentiated are
train/objective.py's (a ``Gradient``: the default, or DP-SGD's from privacy/dpsgd.py). Between
steps run hooks (train/hooks.py): the metrics log, evaluation, checkpoints
(train/checkpoints.py) and any ``add_hook``. Re-running the same
command restores the newest complete checkpoint and continues with the same batches: the losses
equal those of an uninterrupted run. SIGTERM (preemption) saves at the end of the current step.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import signal
import threading
import time
from typing import Any, Callable, Iterator, Mapping, NamedTuple

import gin
import jax
import jax.numpy as jnp
import numpy as np

from flexolmo_jax import distributed, sharding
from flexolmo_jax.config import MeshConfig
from flexolmo_jax.train import metrics as metrics_lib
from flexolmo_jax.train import checkpoints, optim
from flexolmo_jax.train.objective import BATCH_KEYS, Apply, Gradient, packed_count
from flexolmo_jax.train.hooks import Hook, StepLog
from flexolmo_jax.train.programs import TrainState, programs

# Settings that define the data stream and the step: a resume must not change them.
STREAM_KEYS = ("batch_size", "seq_len", "grad_accum", "seed", "data_shards")
# Keys a stream may add to its batches (leading dims [B, T] like the others): router tuning's
# per-token expert dropout mask.
OPTIONAL_BATCH_KEYS = ("expert_keep",)


@gin.configurable(module="flexolmo")
@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimization, logging and checkpointing of one training run (docs/method.md §4 defaults)."""

  steps: int = 1000
  batch_size: int = 16          # global sequences per step (split over hosts and devices)
  seq_len: int = 256
  grad_accum: int = 1           # micro-batches per step
  learning_rate: float = 9e-4
  warmup_steps: int = 100
  final_lr_fraction: float = 0.1
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  grad_clip: float = 1.0
  # The learning rate of router rows and negative biases, relative to every other weight's
  # (0 holds them at their initialization). Adam moves every coordinate by about the learning
  # rate per step whatever its gradient's size, so at 3e-3 a router row of norm ~1 in d=64 is
  # rewritten within tens of steps.
  router_lr_scale: float = 1.0
  lm_z_loss_weight: float = 1e-5
  log_every: int = 10
  eval_every: int = 0           # 0: evaluate at the end only
  eval_batches: int = 16
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  async_checkpoints: bool = True
  seed: int = 0
  # The training stream is read as this many shards (0: one per host); fix it to keep a run's
  # batches the same on another number of hosts (streams.train_stream).
  data_shards: int = 0
  peak_tflops: float = 0.0      # per device; 0: measure the matmul peak of this machine
  mesh: MeshConfig = MeshConfig(data=-1)

  def __post_init__(self):
    # Values arrive from gin files and --gin. bindings as any Python literal: check their kinds.
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if field.type == "int" and (not isinstance(value, int) or isinstance(value, bool)):
        raise ValueError(f"TrainConfig: {field.name}={value!r} must be an integer.")
      if field.type == "float" and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                    or not math.isfinite(value)):
        raise ValueError(f"TrainConfig: {field.name}={value!r} must be a finite number.")
    for name in ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "checkpoint_every",
                 "keep_checkpoints"):
      if getattr(self, name) < 1:
        raise ValueError(f"TrainConfig: {name}={getattr(self, name)} must be >= 1.")
    for name in ("learning_rate", "eps"):
      if getattr(self, name) <= 0:
        raise ValueError(f"TrainConfig: {name}={getattr(self, name)} must be above 0.")
    for name in ("warmup_steps", "eval_every", "eval_batches", "seed", "weight_decay",
                 "grad_clip", "lm_z_loss_weight", "peak_tflops", "final_lr_fraction",
                 "router_lr_scale"):
      if getattr(self, name) < 0:
        raise ValueError(f"TrainConfig: {name}={getattr(self, name)} must be >= 0.")
    for name in ("b1", "b2"):
      if not 0 <= getattr(self, name) < 1:
        raise ValueError(f"TrainConfig: {name}={getattr(self, name)} must be in [0, 1).")
    if self.data_shards < 0:
      raise ValueError(f"TrainConfig: data_shards={self.data_shards} must be >= 0.")
    if self.batch_size % self.grad_accum:
      raise ValueError(f"TrainConfig: batch_size={self.batch_size} is not divisible by "
                       f"grad_accum={self.grad_accum}.")


def check_seq_len(cfg: TrainConfig, max_seq_len: int) -> None:
  """Training sequences no longer than the model's positions (RoPE has no table past them, and
  a longer run would publish a model asked to work beyond what it declares)."""
  if cfg.seq_len > max_seq_len:
    raise ValueError(f"--seq-len {cfg.seq_len} is longer than the model's max_seq_len "
                     f"{max_seq_len}.")


def stream_settings(cfg: TrainConfig) -> dict:
  """The STREAM_KEYS of ``cfg`` as this run uses them (``data_shards`` 0 is the host count;
  checkpoints from before it existed were single-host, hence 1)."""
  return {**{k: getattr(cfg, k) for k in STREAM_KEYS},
          "data_shards": cfg.data_shards or jax.process_count()}


class TrainResult(NamedTuple):
  params: Any
  step: int
  preempted: bool
  tokens_seen: int
  documents_seen: int
  eval_losses: dict
  frozen: Any                 # the frozen tree as the loop holds it at the end (never updated)
  optimizer_params: int       # floats in the first Adam moment = trainable parameters tracked


@dataclasses.dataclass
class Progress:
  """Where a run is: what a checkpoint's meta records besides the state."""

  step: int = 0
  tokens_seen: int = 0
  documents_seen: int = 0
  rng: list = dataclasses.field(default_factory=list)


class Trainer:
  """Runs ``cfg.steps`` optimizer steps of ``apply`` over ``stream(start_step)``.

  ``stream(start)`` returns an iterator over this host's numpy batches beginning at batch
  ``start`` of the deterministic stream; ``eval_streams`` maps a domain name to a function
  returning a finite iterator over its validation batches (the per-domain losses).
  """

  def __init__(self, cfg: TrainConfig, *, workdir: str, apply: Apply, params, frozen,
               param_shardings, frozen_shardings, mesh, rules: sharding.ShardingRules,
               stream: Callable[[int], Iterator[Mapping[str, np.ndarray]]],
               eval_streams: Mapping[str, Callable[[], Iterator]] | None = None,
               flops_per_token: float = 0.0, expert_names=(), gradient: Gradient | None = None):
    self.cfg, self.workdir, self.apply = cfg, workdir, apply
    self.mesh, self.rules = mesh, rules
    self.stream, self.eval_streams = stream, dict(eval_streams or {})
    self.flops_per_token, self.expert_names = flops_per_token, tuple(expert_names)
    self.programs = programs(cfg, apply, params, param_shardings, frozen_shardings, mesh, rules,
                             gradient)
    self.gradient, self.tx = self.programs.gradient, self.programs.tx
    self.state_shardings = self.programs.state_shardings
    self.batch_sharding = self.programs.batch_sharding
    self.train_batch_sharding = self.programs.train_batch_sharding
    self.frozen_shardings = frozen_shardings
    self.frozen = jax.device_put(frozen, frozen_shardings)
    # The state is donated to the step: it must own its buffers (never alias ``frozen``'s).
    params = jax.device_put(jax.tree.map(lambda x: jnp.array(x, copy=True), params),
                            param_shardings)
    self.state = TrainState(jax.device_put(jnp.int32(0), self.state_shardings.step), params,
                            self.programs.init_optimizer(params))
    self._step_fn, self._eval_fn = self.programs.step, self.programs.evaluate
    self.hooks: list[Hook] = []
    self._stop = threading.Event()

  def add_hook(self, fn: Callable[[int], None], every: int, at_last: bool = True) -> None:
    """Calls ``fn(step)`` after every ``every``-th step (and after the last one)."""
    self.hooks.append(Hook(fn, every, at_last))

  # ------------------------------------------------------------------ data

  def stream_settings(self) -> dict:
    """What defines the data stream and the step; a resume must find the same values."""
    return {**stream_settings(self.cfg), **self.gradient.stream_settings}

  def device_batch(self, batch: Mapping[str, np.ndarray]):
    """This host's packed rows as one global batch, data-parallel over the mesh."""
    rows = self.cfg.batch_size // jax.process_count()
    out = {}
    for key in BATCH_KEYS + tuple(k for k in OPTIONAL_BATCH_KEYS if k in batch):
      x = np.asarray(batch[key])
      if x.shape[0] < rows:   # a short final eval batch: padded rows carry no loss weight
        x = np.concatenate([x, np.zeros((rows - x.shape[0], *x.shape[1:]), x.dtype)])
      out[key] = jax.make_array_from_process_local_data(self.batch_sharding, x)
    return out

  def train_batch(self, batch: Mapping[str, np.ndarray]):
    """A training batch laid out as the step takes it."""
    if self.gradient.replicated_batch:
      return jax.device_put(dict(batch), self.train_batch_sharding)
    return self.device_batch(batch)

  def step(self, batch: Mapping[str, np.ndarray]):
    """One optimizer step on a host batch; returns its (device) metrics."""
    self.state, metrics = self._step_fn(self.state, self.frozen, self.train_batch(batch))
    return metrics

  def evaluate(self, params=None) -> dict[str, float]:
    """Mean validation loss per domain (every batch of each stream, up to ``eval_batches``).

    With several hosts, each reads its own shard of a split, so their batch counts can differ:
    they agree on the largest and the shorter ones add batches that carry no loss weight (every
    host must run every step of a collective program)."""
    params = self.state.params if params is None else params
    losses = {}
    for name, make in self.eval_streams.items():
      batches = list(itertools.islice(make(), self.cfg.eval_batches))
      count = distributed.agree_max(len(batches))
      if len(batches) < count:
        if not batches:
          raise ValueError(f"Validation data {name!r} gave this host (process "
                           f"{jax.process_index()}) no batch while another host has {count}; "
                           "give it more validation documents or use fewer hosts.")
        empty = {k: v[:0] for k, v in batches[0].items()}
        batches += [empty] * (count - len(batches))
      total = np.zeros(2)
      for batch in batches:
        total += np.asarray(self._eval_fn(params, self.frozen, self.device_batch(batch)))
      losses[name] = float(total[0] / max(total[1], 1.0))
    return losses

  # ------------------------------------------------------------------ the loop

  def train(self) -> TrainResult:
    cfg = self.cfg
    mgr = checkpoints.manager(self.workdir, cfg.keep_checkpoints, cfg.async_checkpoints)
    progress, window = self._resume(mgr)
    writer = metrics_lib.MetricsWriter(self.workdir, cfg.steps, resume_step=progress.step)
    if progress.step:
      writer.console(progress.step, {"kind": "resume", "from": f"checkpoint {progress.step}"})
    log = StepLog(writer, self._record_fn(), cfg.log_every, cfg.steps, window)
    eval_losses: dict = {}

    def evaluate(step):
      eval_losses.update(self.evaluate())
      writer.write(step, {"loss": dict(eval_losses)}, kind="eval")

    hooks = ([Hook(evaluate, cfg.eval_every, at_last=False)]
             if cfg.eval_every and self.eval_streams else []) + self.hooks
    save = lambda step, force=False: checkpoints.save(
        mgr, self.state, self._meta(progress, log.window), force=force)
    previous = self._install_sigterm()
    try:
      preempted = self._run(progress, log, hooks, save)
      if preempted:
        writer.console(progress.step, {"kind": "preempted", "saved": f"checkpoint {progress.step}"})
      elif self.eval_streams and not eval_losses:
        evaluate(int(self.state.step))
    finally:
      mgr.wait_until_finished()
      mgr.close()
      writer.close()
      if previous is not None:
        signal.signal(signal.SIGTERM, previous)
    return TrainResult(self.state.params, int(self.state.step), preempted, progress.tokens_seen,
                       progress.documents_seen, eval_losses, self.frozen,
                       optim.count_state_params(self.state.opt_state))

  def _run(self, progress: Progress, log: StepLog, hooks: list[Hook], save) -> bool:
    """The steps from ``progress.step``; True if preempted (saved at the step it stopped)."""
    cfg, count = self.cfg, self.gradient.count or packed_count
    batches = self.stream(progress.step)
    for step in range(progress.step + 1, cfg.steps + 1):
      try:
        host_batch = next(batches)
      except StopIteration:
        raise ValueError(f"The training stream ended before step {step}; use a repeating "
                         "stream (num_epochs=None) or fewer steps.") from None
      docs, tokens = count(host_batch)
      progress.step, progress.documents_seen = step, progress.documents_seen + docs
      progress.tokens_seen += tokens
      started = time.perf_counter()
      log.add(step, self.step(host_batch), started)
      for hook in hooks:
        if hook.due(step, cfg.steps):
          hook.fn(step)
      if self._stop_requested():
        save(step, force=True)
        return True
      if step % cfg.checkpoint_every == 0 or step == cfg.steps:
        save(step)
    return False

  def _resume(self, mgr) -> tuple[Progress, list]:
    """The run's progress and unlogged metrics from its newest checkpoint (or a fresh start)."""
    restored = checkpoints.restore(mgr, self.state, self.state_shardings, self.stream_settings())
    if restored is None:
      rng = np.asarray(jax.random.key_data(jax.random.key(self.cfg.seed)), np.uint32)
      return Progress(rng=rng.tolist()), []
    state, meta = restored
    self.state = TrainState(*state)
    return (Progress(int(meta["step"]), int(meta["tokens_seen"]), int(meta["documents_seen"]),
                     list(meta["rng"])),
            checkpoints.restore_window(meta.get("metrics_window", [])))

  def _meta(self, progress: Progress, window) -> dict:
    return {"step": progress.step, "data_position": progress.step, "rng": progress.rng,
            "tokens_seen": progress.tokens_seen, "documents_seen": progress.documents_seen,
            "train_config": self.stream_settings(),
            "state_structure": checkpoints.state_structure(self.state),
            "metrics_window": checkpoints.host_window(window)}

  def _record_fn(self):
    """``(host_metrics, seconds, compile_s) -> record`` of the logged steps."""
    if self.cfg.peak_tflops:
      peak = self.cfg.peak_tflops * 1e12 * jax.device_count()
    else:   # measured on one device; CPU "devices" share one host, whose peak this already is
      peak = metrics_lib.measure_matmul_peak()
      peak *= 1 if jax.default_backend() == "cpu" else jax.device_count()

    def record(host_metrics, seconds, compile_s) -> dict:
      rec = metrics_lib.train_record(host_metrics, self.expert_names)
      if compile_s is not None:
        rec["compile_s"] = compile_s
      elif seconds:
        tps = float(sum(x["tokens"] for x in host_metrics)) / seconds
        rec["tokens_per_s"] = tps
        if self.flops_per_token:
          rec["mfu"] = tps * self.flops_per_token / peak
      if self.gradient.record is not None:
        rec.update(self.gradient.record(host_metrics))
      return rec

    return record

  def _stop_requested(self) -> bool:
    """SIGTERM reached this process, or (several hosts) any of them: all stop at the same step."""
    if jax.process_count() == 1:
      return self._stop.is_set()
    return bool(distributed.agree_max(int(self._stop.is_set())))

  def _install_sigterm(self):
    if threading.current_thread() is not threading.main_thread():
      return None
    return signal.signal(signal.SIGTERM, lambda *_: self._stop.set())

