"""The jitted programs of a training run: the optimizer step, the evaluation step and the
optimizer's initialization, with the layouts they take on the mesh.

They are built from the trainable parameters' shapes alone (concrete arrays or
``jax.ShapeDtypeStruct``s), so the loop (train/loop.py) runs and ``flexolmo plan`` compiles the
same programs.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from flexolmo_jax import sharding
from flexolmo_jax.train import optim
from flexolmo_jax.train.objective import Apply, Gradient, lm_gradient, lm_loss_sums


class TrainState(NamedTuple):
  step: jax.Array
  params: Any
  opt_state: Any



class Programs(NamedTuple):
  """The jitted programs of a run and the layouts they take; built from concrete or abstract
  (``jax.ShapeDtypeStruct``) parameters, so ``flexolmo plan`` compiles exactly what runs."""

  step: Callable              # (TrainState, frozen, batch) -> (TrainState, metrics); donates the state
  evaluate: Callable          # (params, frozen, batch) -> [nll sum, weight sum]
  init_optimizer: Callable    # params -> optimizer state, laid out as ``state_shardings.opt_state``
  state_shardings: TrainState
  batch_sharding: NamedSharding         # an evaluation batch (and a training batch, usually)
  train_batch_sharding: NamedSharding   # replicated for DP-SGD's per-document batches
  gradient: Gradient
  tx: optax.GradientTransformation


def programs(cfg, apply: Apply, params, param_shardings, frozen_shardings, mesh,
             rules: sharding.ShardingRules, gradient: Gradient | None = None) -> Programs:
  """The training step, the evaluation step and the optimizer's initialization of a run
  (``cfg`` is its loop.TrainConfig)."""
  gradient = gradient or lm_gradient(apply, cfg)
  tx = optim.adamw(cfg, params)
  lr = optim.schedule(cfg.learning_rate, cfg.steps, cfg.warmup_steps, cfg.final_lr_fraction)
  replicated = NamedSharding(mesh, PartitionSpec())
  opt_shardings = optim.state_shardings(jax.eval_shape(tx.init, params), param_shardings,
                                        replicated)
  state_shardings = TrainState(replicated, param_shardings, opt_shardings)
  batch_sharding = sharding.batch_sharding(mesh, rules, (cfg.batch_size, cfg.seq_len))
  train_batch_sharding = replicated if gradient.replicated_batch else batch_sharding

  def train_step(state: TrainState, frozen, batch):
    grads, metrics = gradient.fn(state.params, frozen, batch, state.step)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, "grad_norm": optax.global_norm(grads), "lr": lr(state.step)}
    return TrainState(state.step + 1, params, opt_state), metrics

  def eval_step(params, frozen, batch):
    logits, _ = apply(params, frozen, batch)
    sums = lm_loss_sums(logits, batch)
    return jnp.stack([sums.nll, sums.weight])

  return Programs(
      step=sharding.jit_sharded(
          train_step, mesh, rules,
          in_shardings=(state_shardings, frozen_shardings, train_batch_sharding),
          out_shardings=(state_shardings, replicated), donate_argnums=(0,)),
      evaluate=sharding.jit_sharded(
          eval_step, mesh, rules, in_shardings=(param_shardings, frozen_shardings, batch_sharding),
          out_shardings=replicated),
      init_optimizer=jax.jit(tx.init, out_shardings=opt_shardings),
      state_shardings=state_shardings, batch_sharding=batch_sharding,
      train_batch_sharding=train_batch_sharding, gradient=gradient, tx=tx)
