"""The training loop every trainer uses: one jitted step under the mesh, metrics, checkpoints, resume.

A trainer supplies ``apply(params, frozen, batch) -> (logits, ModelAux)`` plus the initial
*trainable* tree ``params`` and the *frozen* tree (empty for pre-training, the public model for
expert training). Gradients, optimizer state and updates exist for ``params`` only.

The objective per step is ``CE + lm_z_loss_weight * mean(logsumexp(logits)^2) + ModelAux.moe_loss``
(router z-loss), with token means taken under the packing's ``decoder_loss_weights``. With
``grad_accum = n`` the batch is split into n micro-batches whose gradients are summed with the
*global* token count as denominator, so the update equals the one of the whole batch.

Checkpoints (Orbax ``CheckpointManager`` under ``<workdir>/checkpoints``) hold the step, the
trainable parameters and the optimizer state, plus a JSON item with the data-stream position, the
RNG and the run's stream-defining settings. A save is finalized by an atomic rename, so a save
killed half-way leaves a temporary directory that is never restored from. Re-running the same
command restores the newest complete checkpoint and continues with the same batches: the losses
equal those of an uninterrupted run. SIGTERM (preemption) saves at the end of the current step.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator, Mapping, NamedTuple

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from flexolmo_jax import distributed, sharding
from flexolmo_jax.config import MeshConfig
from flexolmo_jax.train import metrics as metrics_lib
from flexolmo_jax.train import optim

BATCH_KEYS = ("decoder_input_tokens", "decoder_target_tokens", "decoder_segment_ids",
              "decoder_positions", "decoder_loss_weights")
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
                 "grad_clip", "lm_z_loss_weight", "peak_tflops", "final_lr_fraction"):
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


class TrainState(NamedTuple):
  step: jax.Array
  params: Any
  opt_state: Any


class LossSums(NamedTuple):
  nll: jax.Array       # sum over target tokens of -log p, weighted by the loss weights
  z: jax.Array         # sum of logsumexp(logits)^2, weighted
  weight: jax.Array    # sum of the loss weights (tokens that count)


def lm_loss_sums(logits_btv, batch) -> LossSums:
  w = batch["decoder_loss_weights"].astype(jnp.float32)
  logz = jax.nn.logsumexp(logits_btv, axis=-1)
  target = jnp.take_along_axis(logits_btv, batch["decoder_target_tokens"][..., None], -1)[..., 0]
  return LossSums(jnp.sum((logz - target) * w), jnp.sum(jnp.square(logz) * w), jnp.sum(w))


class TrainResult(NamedTuple):
  params: Any
  step: int
  preempted: bool
  tokens_seen: int
  documents_seen: int
  eval_losses: dict
  frozen: Any                 # the frozen tree as the loop holds it at the end (never updated)
  optimizer_params: int       # floats in the first Adam moment = trainable parameters tracked


Apply = Callable[[Any, Any, Mapping[str, jax.Array]], tuple[jax.Array, Any]]


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
               flops_per_token: float = 0.0, expert_names=()):
    self.cfg, self.workdir, self.apply = cfg, workdir, apply
    self.mesh, self.rules = mesh, rules
    self.stream, self.eval_streams = stream, dict(eval_streams or {})
    self.flops_per_token, self.expert_names = flops_per_token, tuple(expert_names)
    self.tx = optim.adamw(cfg, params)
    self.lr = optim.schedule(cfg.learning_rate, cfg.steps, cfg.warmup_steps, cfg.final_lr_fraction)
    replicated = NamedSharding(mesh, PartitionSpec())
    self.frozen_shardings = frozen_shardings
    self.frozen = jax.device_put(frozen, frozen_shardings)
    # The state is donated to the step: it must own its buffers (never alias ``frozen``'s).
    params = jax.device_put(jax.tree.map(lambda x: jnp.array(x, copy=True), params),
                            param_shardings)
    opt_state = jax.jit(self.tx.init)(params)
    opt_shardings = jax.tree.map(
        lambda x: x.sharding if isinstance(x.sharding, NamedSharding) else replicated, opt_state)
    self.state_shardings = TrainState(replicated, param_shardings, opt_shardings)
    self.state = TrainState(jax.device_put(jnp.int32(0), replicated), params,
                            jax.device_put(opt_state, opt_shardings))
    shape = (cfg.batch_size, cfg.seq_len)
    self.batch_sharding = sharding.batch_sharding(mesh, rules, shape)
    self._stop = threading.Event()
    self._step_fn = sharding.jit_sharded(
        self._train_step, mesh, rules,
        in_shardings=(self.state_shardings, frozen_shardings, self._step_batch_sharding()),
        out_shardings=(self.state_shardings, replicated), donate_argnums=(0,))
    self._eval_fn = sharding.jit_sharded(
        self._eval_step, mesh, rules,
        in_shardings=(param_shardings, frozen_shardings, self.batch_sharding),
        out_shardings=replicated)

  # ------------------------------------------------------------------ jitted functions

  def _train_step(self, state: TrainState, frozen, batch):
    cfg = self.cfg
    n = cfg.grad_accum
    total_weight = jnp.maximum(jnp.sum(batch["decoder_loss_weights"].astype(jnp.float32)), 1.0)

    def objective(params, micro):
      logits, aux = self.apply(params, frozen, micro)
      sums = lm_loss_sums(logits, micro)
      value = (sums.nll + cfg.lm_z_loss_weight * sums.z) / total_weight + aux.moe_loss / n
      return value, (sums, aux)

    grad_fn = jax.value_and_grad(objective, has_aux=True)
    if n == 1:
      (_, (sums, aux)), grads = grad_fn(state.params, batch)
    else:
      micro = jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)

      def accumulate(acc, mb):
        (_, out), g = grad_fn(state.params, mb)
        return jax.tree.map(jnp.add, acc, g), out

      grads, (sums, aux) = jax.lax.scan(
          accumulate, jax.tree.map(jnp.zeros_like, state.params), micro)
      sums = jax.tree.map(jnp.sum, sums)
      aux = jax.tree.map(lambda a: jnp.mean(a, axis=0), aux)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": sums.nll / total_weight, "lm_z_loss": sums.z / total_weight,
               "router_z_loss": aux.router_z_loss, "grad_norm": optax.global_norm(grads),
               "lr": self.lr(state.step), "tokens": sums.weight,
               "expert_share": aux.expert_share}
    return TrainState(state.step + 1, params, opt_state), metrics

  def _eval_step(self, params, frozen, batch):
    logits, _ = self.apply(params, frozen, batch)
    sums = lm_loss_sums(logits, batch)
    return jnp.stack([sums.nll, sums.weight])

  # ------------------------------------------------------------------ data

  def _step_batch_sharding(self):
    """How the training step takes its batch (``_device_batch`` lays batches out so)."""
    return self.batch_sharding

  def state_structure(self) -> str:
    """A digest of the training state's leaves (paths, shapes, dtypes): what a checkpoint must
    match to be resumed by this trainer."""
    leaves = jax.tree_util.tree_flatten_with_path(self.state)[0]
    text = "\n".join(f"{jax.tree_util.keystr(path)}|{leaf.shape}|{leaf.dtype}"
                     for path, leaf in leaves)
    return hashlib.sha256(text.encode()).hexdigest()

  def stream_settings(self) -> dict:
    """What defines the data stream and the step; a resume must find the same values."""
    return stream_settings(self.cfg)

  def _count(self, host_batch) -> tuple[int, int]:
    """(documents, tokens) of a step, counted on the host (no device sync); hosts read equal
    shares of the batch."""
    docs = np.sum((host_batch["decoder_positions"] == 0) & (host_batch["decoder_segment_ids"] > 0))
    tokens = np.sum(host_batch["decoder_loss_weights"])
    return int(docs) * jax.process_count(), int(tokens) * jax.process_count()

  def _device_batch(self, batch: Mapping[str, np.ndarray]):
    rows = self.cfg.batch_size // jax.process_count()
    out = {}
    for key in BATCH_KEYS + tuple(k for k in OPTIONAL_BATCH_KEYS if k in batch):
      x = np.asarray(batch[key])
      if x.shape[0] < rows:   # a short final eval batch: padded rows carry no loss weight
        x = np.concatenate([x, np.zeros((rows - x.shape[0], *x.shape[1:]), x.dtype)])
      out[key] = jax.make_array_from_process_local_data(self.batch_sharding, x)
    return out

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
        total += np.asarray(self._eval_fn(params, self.frozen, self._device_batch(batch)))
      losses[name] = float(total[0] / max(total[1], 1.0))
    return losses

  # ------------------------------------------------------------------ checkpoints

  def _manager(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(self.workdir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=self.cfg.keep_checkpoints, create=True,
            enable_async_checkpointing=self.cfg.async_checkpoints))

  def _save(self, manager, meta: dict, force: bool = False) -> None:
    step = int(meta["step"])
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(self.state),
                                               meta=ocp.args.JsonSave(meta)), force=force)

  def _restore(self, manager) -> dict | None:
    steps = [s for s in manager.all_steps() if is_complete(manager.directory / str(s))]
    if not steps:
      return None
    step = max(steps)
    where = manager.directory / str(step)
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    saved, now = {"data_shards": 1, **meta["train_config"]}, self.stream_settings()
    changed = {k: (saved.get(k), now[k]) for k in now if saved.get(k) != now[k]}
    if changed:
      raise ValueError(
          f"Cannot resume from {where}: {changed} (saved, now) define the data stream; use the "
          "saved values or a new output directory.")
    if meta.get("state_structure", self.state_structure()) != self.state_structure():
      raise ValueError(
          f"Cannot resume from {where}: it holds the state of another model (another --model, "
          "config or experts than this command's); use the run's own settings or a new output "
          "directory (--out).")
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        self.state, self.state_shardings)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    self.state = TrainState(*restored["state"])
    return meta

  # ------------------------------------------------------------------ the loop

  def train(self) -> TrainResult:
    cfg = self.cfg
    manager = self._manager()
    meta = self._restore(manager)
    start = 0 if meta is None else int(meta["step"])
    tokens_seen = 0 if meta is None else int(meta["tokens_seen"])
    docs_seen = 0 if meta is None else int(meta["documents_seen"])
    rng = np.asarray(jax.random.key_data(jax.random.key(cfg.seed)) if meta is None
                     else meta["rng"], np.uint32)
    writer = metrics_lib.MetricsWriter(self.workdir, cfg.steps, resume_step=start)
    if start:
      writer.console(start, {"kind": "resume", "from": f"checkpoint {start}"})
    if cfg.peak_tflops:
      peak = cfg.peak_tflops * 1e12 * jax.device_count()
    else:   # measured on one device; CPU "devices" share one host, whose peak this already is
      peak = metrics_lib.measure_matmul_peak()
      peak *= 1 if jax.default_backend() == "cpu" else jax.device_count()
    previous = self._install_sigterm()
    preempted = False
    eval_losses: dict = {}

    def meta_now(step):
      return {"step": step, "data_position": step, "rng": rng.tolist(),
              "tokens_seen": tokens_seen, "documents_seen": docs_seen,
              "train_config": self.stream_settings(),
              "state_structure": self.state_structure(),
              "metrics_window": _host_window(window)}

    try:
      batches = self.stream(start)
      # The steps since the last logged record: a resumed run continues the saved window, so
      # its records equal an uninterrupted run's.
      window = [] if meta is None else _restore_window(meta.get("metrics_window", []))
      t_window, compile_s = None, None
      for step in range(start + 1, cfg.steps + 1):
        try:
          host_batch = next(batches)
        except StopIteration:
          raise ValueError(f"The training stream ended before step {step}; use a repeating "
                           "stream (num_epochs=None) or fewer steps.") from None
        docs, tokens = self._count(host_batch)
        docs_seen += docs
        tokens_seen += tokens
        t0 = time.perf_counter()
        self.state, m = self._step_fn(self.state, self.frozen, self._device_batch(host_batch))
        window.append(m)
        first = compile_s is None      # the first step of this process compiles
        if first:
          jax.block_until_ready(m)
          compile_s = time.perf_counter() - t0
          t_window = time.perf_counter()
        if first and step == 1:        # a fresh run logs its first step alone, with that time
          writer.write(step, self._record(window, None, peak, compile_s))
          window = []
        elif step % cfg.log_every == 0 or step == cfg.steps:
          jax.block_until_ready(m)
          now = time.perf_counter()
          host = jax.device_get(window)
          writer.write(step, self._record(host, now - t_window, peak))
          t_window, window = now, []
        if cfg.eval_every and step % cfg.eval_every == 0 and self.eval_streams:
          eval_losses = self.evaluate()
          writer.write(step, {"loss": eval_losses}, kind="eval")
        if self._stop_requested():
          self._save(manager, meta_now(step), force=True)
          writer.console(step, {"kind": "preempted", "saved": f"checkpoint {step}"})
          preempted = True
          break
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
          self._save(manager, meta_now(step))
      if not preempted and self.eval_streams and not eval_losses:
        eval_losses = self.evaluate()
        writer.write(int(self.state.step), {"loss": eval_losses}, kind="eval")
    finally:
      manager.wait_until_finished()
      manager.close()
      writer.close()
      if previous is not None:
        signal.signal(signal.SIGTERM, previous)
    return TrainResult(self.state.params, int(self.state.step), preempted, tokens_seen, docs_seen,
                       eval_losses, self.frozen, optim.count_state_params(self.state.opt_state))

  def _record(self, host_metrics, seconds, peak, compile_s=None) -> dict:
    last = host_metrics[-1]
    rec = {"loss": float(np.mean([x["loss"] for x in host_metrics])),
           "lr": float(last["lr"]), "grad_norm": float(last["grad_norm"]),
           "lm_z_loss": float(last["lm_z_loss"])}
    if self.expert_names:
      share = np.mean([x["expert_share"] for x in host_metrics], axis=0)
      rec["router_z_loss"] = float(last["router_z_loss"])
      rec["expert_share"] = {n: float(s) for n, s in zip(self.expert_names, share)}
    if compile_s is not None:
      rec["compile_s"] = compile_s
    elif seconds:
      tps = float(sum(x["tokens"] for x in host_metrics)) / seconds
      rec["tokens_per_s"] = tps
      if self.flops_per_token:
        rec["mfu"] = tps * self.flops_per_token / peak
    return rec

  def _stop_requested(self) -> bool:
    """SIGTERM reached this process, or (several hosts) any of them: all stop at the same step."""
    if jax.process_count() == 1:
      return self._stop.is_set()
    return bool(distributed.agree_max(int(self._stop.is_set())))

  def _install_sigterm(self):
    if threading.current_thread() is not threading.main_thread():
      return None
    return signal.signal(signal.SIGTERM, lambda *_: self._stop.set())


def _host_window(window) -> list[dict]:
  """The metrics of the steps not logged yet, as JSON for a checkpoint: [value, dtype] each."""
  return [{k: [np.asarray(v).tolist(), np.asarray(v).dtype.str] for k, v in m.items()}
          for m in jax.device_get(window)]


def _restore_window(saved) -> list[dict]:
  """:func:`_host_window` read back, values in their dtypes (so means round as before); their
  token counts are zeroed, as their time was spent before the restart (tokens/s counts only
  this process's steps)."""
  return [{k: np.zeros((), dtype) if k == "tokens" else np.asarray(v, dtype)
           for k, (v, dtype) in m.items()} for m in saved]


def is_complete(step_dir) -> bool:
  """A finalized Orbax step directory (temporary directories of unfinished saves have other names)."""
  step_dir = os.fspath(step_dir)
  return (os.path.basename(step_dir).isdigit()
          and os.path.exists(os.path.join(step_dir, "_CHECKPOINT_METADATA"))
          and os.path.exists(os.path.join(step_dir, "meta", "metadata")))
