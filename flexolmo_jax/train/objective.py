"""What a training step minimizes and how it gets its gradient.

The objective per step is ``CE + lm_z_loss_weight * mean(logsumexp(logits)^2) + ModelAux.moe_loss``
(router z-loss), with token means taken under the packing's ``decoder_loss_weights``. With
``grad_accum = n`` the batch is split into n micro-batches whose gradients are summed with the
*global* token count as denominator, so the update equals the one of the whole batch. A
:class:`Gradient` is how a step differentiates it: :func:`lm_gradient` by default, DP-SGD's
per-document clipped and noised gradient in privacy/dpsgd.py.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

BATCH_KEYS = ("decoder_input_tokens", "decoder_target_tokens", "decoder_segment_ids",
              "decoder_positions", "decoder_loss_weights")

Apply = Callable[[Any, Any, Mapping[str, jax.Array]], tuple[jax.Array, Any]]


class LossSums(NamedTuple):
  nll: jax.Array       # sum over target tokens of -log p, weighted by the loss weights
  z: jax.Array         # sum of logsumexp(logits)^2, weighted
  weight: jax.Array    # sum of the loss weights (tokens that count)


def lm_loss_sums(logits_btv, batch) -> LossSums:
  w = batch["decoder_loss_weights"].astype(jnp.float32)
  logz = jax.nn.logsumexp(logits_btv, axis=-1)
  target = jnp.take_along_axis(logits_btv, batch["decoder_target_tokens"][..., None], -1)[..., 0]
  return LossSums(jnp.sum((logz - target) * w), jnp.sum(jnp.square(logz) * w), jnp.sum(w))


@dataclasses.dataclass(frozen=True)
class Gradient:
  """How a training step gets its gradient from ``(params, frozen, batch, step)``: ``fn``
  returns ``(grads, metrics)``, the metrics holding at least ``loss``, ``lm_z_loss``,
  ``router_z_loss``, ``tokens`` and ``expert_share``."""

  fn: Callable
  replicated_batch: bool = False        # every device takes the whole batch (else data-parallel)
  count: Callable | None = None         # host batch -> (documents, tokens); None: packed rows
  stream_settings: Mapping = dataclasses.field(default_factory=dict)   # fixed across a resume
  record: Callable | None = None        # host metrics of the logged steps -> more record entries


def lm_gradient(apply: Apply, cfg) -> Gradient:
  """The objective of the module docstring over the packed batch, ``grad_accum`` micro-batches
  at a time with the whole batch's token count as denominator."""
  n = cfg.grad_accum

  def fn(params, frozen, batch, step):
    total_weight = jnp.maximum(jnp.sum(batch["decoder_loss_weights"].astype(jnp.float32)), 1.0)

    def objective(p, micro):
      logits, aux = apply(p, frozen, micro)
      sums = lm_loss_sums(logits, micro)
      value = (sums.nll + cfg.lm_z_loss_weight * sums.z) / total_weight + aux.moe_loss / n
      return value, (sums, aux)

    grad_fn = jax.value_and_grad(objective, has_aux=True)
    if n == 1:
      (_, (sums, aux)), grads = grad_fn(params, batch)
    else:
      micro = jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)

      def accumulate(acc, mb):
        (_, out), g = grad_fn(params, mb)
        return jax.tree.map(jnp.add, acc, g), out

      grads, (sums, aux) = jax.lax.scan(accumulate, jax.tree.map(jnp.zeros_like, params), micro)
      sums = jax.tree.map(jnp.sum, sums)
      aux = jax.tree.map(lambda a: jnp.mean(a, axis=0), aux)
    return grads, {"loss": sums.nll / total_weight, "lm_z_loss": sums.z / total_weight,
                   "router_z_loss": aux.router_z_loss, "tokens": sums.weight,
                   "expert_share": aux.expert_share}

  return Gradient(fn)


def packed_count(host_batch) -> tuple[int, int]:
  """(documents, tokens) of a step, counted on the host (no device sync); hosts read equal
  shares of the batch."""
  docs = np.sum((host_batch["decoder_positions"] == 0) & (host_batch["decoder_segment_ids"] > 0))
  tokens = np.sum(host_batch["decoder_loss_weights"])
  return int(docs) * jax.process_count(), int(tokens) * jax.process_count()
