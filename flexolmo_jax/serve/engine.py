"""Continuous batching: requests join and leave a fixed batch of slots between decode steps.

The engine owns one KV cache of ``slots`` rows of ``context`` positions. Between two steps it
admits waiting requests into free rows (one prefill each, compiled once per prompt-length
bucket), then runs one decode step for every row at once (compiled once), whatever each row's
experts, sampling settings and seed. A row leaves at its end-of-text token, at its ``max_tokens``
or when cancelled (a stop string, a client gone), and its row is free for the next request at
the next step. Nothing is recompiled per request.

Each request names its experts the way ``flexolmo generate --experts/--exclude`` does, and is
refused the same way (unknown names, a selection the top-k policy rejects); its opt-outs are a
mask on its router logits, which is the model ``load_merged`` builds for that selection
(model/moe.route): greedy rows give ``generate``'s tokens for that selection.
"""
from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flexolmo_jax import experts as experts_lib
from flexolmo_jax.config import ModelConfig
from flexolmo_jax.eval.generate import Sampling
from flexolmo_jax.model.layers import dtype_of
from flexolmo_jax.serve import programs

log = logging.getLogger(__name__)
MIN_BUCKET = 16
# Decode runs up to this many steps per program when no request waits for a row (fewer when a
# row has fewer tokens left): the host's work per step is paid once per burst. 32 rows of the
# quick demo's model: 1.2 ms a step one at a time, 0.95 ms in bursts of 8.
MAX_BURST = 8


class RequestError(ValueError):
  """A request the engine refuses, with a message naming what is wrong (an HTTP 400)."""


class Busy(RequestError):
  """The queue of waiting requests is full: a good request, refused for now (an HTTP 503)."""


@dataclasses.dataclass(frozen=True)
class Token:
  token: int


@dataclasses.dataclass(frozen=True)
class Done:
  reason: str                      # "stop" (end of text or a stop string), "length", "cancelled", "error"
  tokens: tuple[int, ...]          # every generated token (an end-of-text token included)
  attribution: dict[str, float]    # each expert's share of the router weight; sums to 1
  error: str | None = None


@dataclasses.dataclass(eq=False)
class Request:
  """One completion. ``emit`` receives its :class:`Token` and :class:`Done` events, through the
  engine's ``deliver`` (by default on the engine's thread, so it must return at once)."""

  prompt: Sequence[int]
  max_tokens: int
  keep: np.ndarray                 # bool [E] over the model's experts
  sampling: Sampling = Sampling()  # greedy by default; checked when made (generate.Sampling)
  emit: Callable[[object], None] = lambda event: None
  each_token: bool = True          # False: only the Done event (no stream, no stop string)
  ignore_eos: bool = False         # run to max_tokens through end-of-text tokens (benchmarks)
  tokens: list[int] = dataclasses.field(default_factory=list)
  weights: np.ndarray | None = None
  stop_reason: str | None = None   # set by cancel(), from any thread

  def cancel(self, reason: str = "cancelled") -> None:
    self.stop_reason = reason


def emit_each(batch: list[tuple[Request, object]]) -> None:
  for r, event in batch:
    r.emit(event)


def buckets(context: int) -> tuple[int, ...]:
  """Prompt lengths the prefill compiles for: powers of two from 16, and ``context``."""
  out = [b for b in (MIN_BUCKET << i for i in range(32)) if b < context]
  return tuple(out) + (context,)


def keep_mask(cfg: ModelConfig, experts=None, exclude=None) -> np.ndarray:
  """The bool ``[E]`` mask of a selection, refused (RequestError) as ``load_merged`` refuses it."""
  if not cfg.is_moe:
    if experts or exclude:
      raise RequestError("experts / exclude apply to merged models; this one is dense.")
    return np.zeros((0,), bool)
  try:
    kept = experts_lib.select(cfg.experts, experts, exclude)
    experts_lib.active(cfg.top_k, cfg.top_k_policy, kept)
  except ValueError as e:
    raise RequestError(str(e)) from None
  return np.asarray([name in kept for name in cfg.experts])


class Engine:
  """The slots, their cache and the scheduler; :meth:`start` runs it on a thread of its own."""

  def __init__(self, cfg: ModelConfig, params: dict, *, slots: int = 32,
               context: int | None = None, eos_id: int | None = None, max_pending: int = 4096,
               deliver: Callable[[list[tuple[Request, object]]], None] = emit_each,
               decode_dispatch: str | None = "dense"):
    """``decode_dispatch``: the MoE dispatch of the decode step (None: the model's own). Dense
    by default: one token per row and ``slots`` rows leave few experts idle, and the dense form
    is one batched matmul per expert where the dropless one sorts each row's assignments
    (32 rows of the quick demo's model: 3.1 ms a step against 4.6 ms; the same function, so the
    same tokens up to float rounding: tests/test_serve.py compares them with ``generate``).
    ``deliver`` receives each step's events at once: a server hands them to its event loop
    in one call, so the loop wakes once per step, not once per row (measured with 32 rows: 2.5k
    tokens/s one wake-up per event, against the engine's 5.1k alone)."""
    if slots < 1:
      raise ValueError(f"slots={slots} must be >= 1.")
    self.cfg, self.params, self.slots, self.eos_id = cfg, jax.device_put(params), slots, eos_id
    self.decode_cfg = cfg.replace(dispatch=decode_dispatch) if decode_dispatch and cfg.is_moe \
        else cfg
    self.context = min(context or cfg.max_seq_len, cfg.max_seq_len)
    self.buckets = buckets(self.context)
    shape = (cfg.n_layers, slots, self.context, cfg.n_kv_heads, cfg.head_dim)
    self.k = jnp.zeros(shape, dtype_of(cfg.dtype))
    self.v = jnp.zeros(shape, dtype_of(cfg.dtype))
    self.rows: list[Request | None] = [None] * slots
    e = cfg.num_experts if cfg.is_moe else 0
    self.state = {"token": np.zeros(slots, np.int32), "index": np.zeros(slots, np.int32),
                  "keep": np.ones((slots, e), bool), "temperature": np.zeros(slots, np.float32),
                  "top_p": np.ones(slots, np.float32), "seed": np.zeros(slots, np.uint32),
                  "step": np.zeros(slots, np.int32)}
    self.pending: queue.Queue[Request] = queue.Queue(max_pending)
    self._wake = threading.Event()
    self._stopped = threading.Event()
    self._thread: threading.Thread | None = None
    self.deliver, self._outbox = deliver, []
    self.steps, self.decode_seconds = 0, 0.0

  # ------------------------------------------------------------------ requests

  def check(self, r: Request) -> None:
    """Refuses a request that cannot run (RequestError), before it takes a place in the queue."""
    p = len(r.prompt)
    if p == 0:
      raise RequestError("the prompt is empty: there is no token to continue from.")
    if not isinstance(r.max_tokens, int) or r.max_tokens < 1:
      raise RequestError(f"max_tokens={r.max_tokens!r} must be an integer >= 1.")
    if p + r.max_tokens > self.context:
      raise RequestError(f"the prompt's {p} tokens + max_tokens {r.max_tokens} exceed the "
                         f"model's context of {self.context} tokens.")
    if r.sampling.top_k is not None:
      raise RequestError("serving samples with temperature and top_p; top_k is not offered.")
    if not 0 <= r.sampling.seed < 2 ** 32:
      raise RequestError(f"seed={r.sampling.seed!r} must be in [0, 2**32).")
    if self.cfg.is_moe and not np.asarray(r.keep).any():
      raise RequestError("every expert is excluded: keep at least one.")
    if any(not 0 <= t < self.cfg.vocab_size for t in r.prompt):
      raise RequestError(f"a prompt token is outside the vocabulary [0, {self.cfg.vocab_size}).")

  def submit(self, r: Request) -> None:
    self.check(r)
    try:
      self.pending.put_nowait(r)
    except queue.Full:
      raise Busy(f"the server holds {self.pending.maxsize} waiting requests already; "
                 "try again later.") from None
    self._wake.set()

  # ------------------------------------------------------------------ scheduling

  def step(self) -> bool:
    """Admits what fits, then decodes one token for every busy row. False when idle."""
    try:
      admitted = self._admit()
      if any(self.rows):
        self._decode()
        return True
      return admitted
    finally:
      self._flush()

  def _emit(self, r: Request, event) -> None:
    self._outbox.append((r, event))

  def _flush(self) -> None:
    if self._outbox:
      batch, self._outbox = self._outbox, []
      self.deliver(batch)

  def _admit(self) -> bool:
    admitted = False
    for slot in range(self.slots):
      if self.rows[slot] is not None:
        continue
      r = self._next_pending()
      if r is None:
        break
      self._prefill(slot, r)
      admitted = True
    return admitted

  def _next_pending(self) -> Request | None:
    while True:
      try:
        r = self.pending.get_nowait()
      except queue.Empty:
        return None
      if r.stop_reason is None:
        return r
      self._emit(r, Done(r.stop_reason, (), {}))

  def _prefill(self, slot: int, r: Request) -> None:
    p = len(r.prompt)
    bucket = next(b for b in self.buckets if b >= p)
    tokens = np.zeros(bucket, np.int32)
    tokens[:p] = r.prompt
    s = self.state
    s["index"][slot], s["step"][slot], s["keep"][slot] = p, 1, r.keep
    s["temperature"][slot] = r.sampling.temperature
    s["top_p"][slot] = 1.0 if r.sampling.top_p is None else r.sampling.top_p
    s["seed"][slot] = r.sampling.seed
    nxt, self.k, self.v, weights = programs.prefill(
        self.params, tokens, self.k, self.v, np.int32(slot), np.int32(p), s["keep"][slot],
        s["temperature"][slot], s["top_p"][slot], s["seed"][slot],
        cfg=self.cfg, context=self.context)
    self.rows[slot] = r
    self._record(slot, int(nxt), np.asarray(weights))

  def burst(self) -> int:
    """Steps of the next decode: 1 while a request waits for a free row (it is admitted at
    the next step), else the largest power of two up to MAX_BURST that no row outlives."""
    if not self.pending.empty() and None in self.rows:
      return 1
    left = min(r.max_tokens - len(r.tokens) for r in self.rows if r is not None)
    return 1 << (max(1, min(left, MAX_BURST)).bit_length() - 1)

  def _decode(self) -> None:
    s, start, steps = self.state, time.perf_counter(), self.burst()
    tokens, self.k, self.v, weights = programs.decode(
        self.params, s["token"], self.k, self.v, s["index"], s["keep"], s["temperature"],
        s["top_p"], s["seed"], s["step"], cfg=self.decode_cfg, steps=steps)
    tokens, weights = np.asarray(tokens), np.asarray(weights)
    self.steps += steps
    self.decode_seconds += time.perf_counter() - start
    for slot, r in enumerate(self.rows):
      for j in range(steps if r is not None else 0):
        if self.rows[slot] is not r:
          break       # finished within the burst: the rest of its tokens are dropped
        s["index"][slot] += 1
        s["step"][slot] += 1
        self._record(slot, int(tokens[j, slot]), weights[j, slot])

  def _record(self, slot: int, token: int, weights: np.ndarray) -> None:
    r = self.rows[slot]
    r.tokens.append(token)
    r.weights = weights if r.weights is None else r.weights + weights
    self.state["token"][slot] = token
    if r.each_token:
      self._emit(r, Token(token))
    if r.stop_reason is not None:
      reason = r.stop_reason
    elif self.eos_id is not None and token == self.eos_id and not r.ignore_eos:
      reason = "stop"
    elif len(r.tokens) >= r.max_tokens:
      reason = "length"
    else:
      return
    self._finish(slot, reason)

  def _finish(self, slot: int, reason: str, error: str | None = None) -> None:
    r = self.rows[slot]
    self.rows[slot] = None
    self.state["keep"][slot] = True
    self._emit(r, Done(reason, tuple(r.tokens), self.attribution(r.weights), error))

  def attribution(self, weights: np.ndarray | None) -> dict[str, float]:
    """Each expert's share of a request's summed router weight (0 for the ones it excluded)."""
    if not self.cfg.is_moe or weights is None or not weights.sum() > 0:
      return {}
    share = weights / weights.sum()
    return {name: float(w) for name, w in zip(self.cfg.experts, share)}

  # ------------------------------------------------------------------ the thread

  def run(self) -> None:
    """Steps until :meth:`stop`; a failed step ends its rows with an error, not the server."""
    while not self._stopped.is_set():
      try:
        busy = self.step()
      except Exception as e:     # noqa: BLE001 - reported to every affected request
        log.exception("serving step failed")
        for slot, r in enumerate(self.rows):
          if r is not None:
            self._finish(slot, "error", f"{type(e).__name__}: {e}")
        self._flush()
        busy = True
      if not busy:
        self._wake.wait(0.05)
        self._wake.clear()

  def start(self) -> "Engine":
    self._thread = threading.Thread(target=self.run, name="flexolmo-serve", daemon=True)
    self._thread.start()
    return self

  def stop(self) -> None:
    self._stopped.set()
    self._wake.set()
    if self._thread is not None:
      self._thread.join()

  def warm_up(self, progress: Callable[[str], None] = lambda line: None) -> None:
    """Compiles the decode step and every prefill bucket before the first request."""
    keep = np.ones(self.cfg.num_experts if self.cfg.is_moe else 0, bool)
    for bucket in self.buckets:
      progress(f"compiling prefill for prompts up to {bucket} tokens")
      r = Request([0] * min(bucket, self.context - 1), 1, keep)
      self._prefill(0, r)
    for steps in (1 << i for i in range(MAX_BURST.bit_length())):
      progress(f"compiling the decode step ({steps} at a time)")
      self.rows[0] = Request([0], steps, keep)
      self._decode()
      self.rows[0] = None
