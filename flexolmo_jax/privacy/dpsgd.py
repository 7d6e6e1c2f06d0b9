"""DP-SGD on the trainable subtree: per-document clipping, Gaussian noise, then the optimizer.

One step, for a batch of documents b (privacy/documents.py) and trainable parameters theta (the
new expert's FFN, router row and negative bias; the frozen public model is a constant input):

    g_b   = grad_theta  loss_b(theta),   loss_b = mean token loss of b + z-losses
    sum   = sum_b  g_b * min(1, C / ||g_b||)                       (jax_privacy.clipped_grad)
    grad  = (sum + N(0, (sigma C)^2 I)) / B                        (B: expected batch size)

then AdamW exactly as in non-DP training (:func:`dp_gradient` is the step's ``Gradient``). Per-document gradients exist ``microbatch_size`` at a
time (vmapped inside a sequential loop over micro-batches), so memory grows with that, not with
the batch. Padding examples have weight 0, hence a zero gradient. The noise key of step s is
``fold_in(key(seed), s)``: a resumed run adds the same noise as an uninterrupted one.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flexolmo_jax.privacy.documents import WEIGHT_KEY
from flexolmo_jax.train.objective import BATCH_KEYS, Gradient, lm_loss_sums


def gaussian_noise(key, tree, std: float):
  """N(0, std^2) for every entry of ``tree`` (float32), one key per leaf."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([std * jax.random.normal(k, x.shape, jnp.float32)
                            for k, x in zip(keys, leaves)])


def private_gradient(example_loss, *, clip: float, noise_multiplier: float,
                     expected_batch_size: float, microbatch_size: int):
  """``(params, batch, key) -> (noised mean gradient, per-example (loss, aux), grad norms)``.

  ``example_loss(params, example) -> (loss, aux)`` sees one example (the batch axis removed);
  ``batch`` holds ``[B, ...]`` arrays and ``example_weight`` [B]."""
  def weighted(params, example):
    loss, aux = example_loss(params, example)
    return example[WEIGHT_KEY] * loss, (loss, aux)

  import jax_privacy   # here: importing it takes 2 s, and only DP runs need it

  summed_clipped = jax_privacy.clipped_grad(
      weighted, has_aux=True, l2_clip_norm=clip, batch_argnums=1, keep_batch_dim=False,
      return_grad_norms=True, microbatch_size=microbatch_size)

  def fn(params, batch, key):
    total, out = summed_clipped(params, batch)
    noise = gaussian_noise(key, total, noise_multiplier * clip)
    grads = jax.tree.map(lambda g, n: (g.astype(jnp.float32) + n) / expected_batch_size,
                         total, noise)
    return grads, out.aux, out.grad_norms
  return fn


def example_loss(apply, params, frozen, example, lm_z_loss_weight: float):
  """One document's objective (``[chunks, T]`` arrays): its mean token loss, the logit z-loss
  over its tokens and the router z-loss; and its per-example statistics."""
  micro = {k: example[k] for k in BATCH_KEYS}
  logits, aux = apply(params, frozen, micro)
  sums = lm_loss_sums(logits, micro)
  tokens = jnp.maximum(sums.weight, 1.0)
  loss = (sums.nll + lm_z_loss_weight * sums.z) / tokens + aux.moe_loss
  return loss, {"nll": sums.nll / tokens, "tokens": sums.weight,
                "router_z_loss": aux.router_z_loss, "expert_share": aux.expert_share}


def dp_gradient(apply, cfg, dp, guarantee) -> Gradient:
  """The training step's gradient under DP-SGD, over per-document batches (replicated on the
  mesh: Poisson batches vary in size). ``cfg`` is the run's TrainConfig, ``dp`` its DPConfig
  and ``guarantee`` its accounting.Guarantee (the noise multiplier and expected batch size)."""
  if cfg.grad_accum != 1:
    raise ValueError(f"DP training: grad_accum={cfg.grad_accum}; DP micro-batching is "
                     f"DPConfig.microbatch_size ({dp.microbatch_size}), keep grad_accum 1.")
  if jax.process_count() > 1:
    raise ValueError("DP training runs in one process (one host, any number of its devices); "
                     f"this run has {jax.process_count()} processes.")
  noise_key = jax.random.key(cfg.seed + 0x5EED)

  def fn(params, frozen, batch, step):
    grad_fn = private_gradient(
        lambda p, ex: example_loss(apply, p, frozen, ex, cfg.lm_z_loss_weight),
        clip=dp.clip, noise_multiplier=guarantee.noise_multiplier,
        expected_batch_size=float(guarantee.batch_size), microbatch_size=dp.microbatch_size)
    grads, (_, per_example), norms = grad_fn(params, batch, jax.random.fold_in(noise_key, step))
    w = batch[WEIGHT_KEY]
    docs = jnp.maximum(jnp.sum(w), 1.0)
    return grads, {"loss": jnp.sum(w * per_example["nll"]) / docs, "lm_z_loss": jnp.float32(0),
                   "router_z_loss": jnp.sum(w * per_example["router_z_loss"]) / docs,
                   "tokens": jnp.sum(w * per_example["tokens"]),
                   "expert_share": jnp.sum(w[:, None] * per_example["expert_share"], 0) / docs,
                   "clipped_fraction": jnp.sum(w * (norms > dp.clip)) / docs}

  return Gradient(
      fn, replicated_batch=True,
      count=lambda host: (int(np.sum(host[WEIGHT_KEY])), int(np.sum(host["decoder_loss_weights"]))),
      stream_settings={"dp_sampling": dp.sampling,
                       "dp_noise_multiplier": guarantee.noise_multiplier, "dp_clip": dp.clip,
                       "dp_chunks_per_document": dp.chunks_per_document},
      record=lambda host: {"clipped": float(np.mean([x["clipped_fraction"] for x in host]))})
