"""Where a merged model's router sends a domain's tokens: the mean router probability of every
expert over the domain's (non-padding) tokens and over layers.

The diagnostic behind opt-out: FlexOlmo works when a domain's tokens go to the public expert and
that domain's own expert; a near-uniform row here means the experts are mixed into every domain.
"""
from __future__ import annotations

import functools
from typing import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from flexolmo_jax.config import ModelConfig
from flexolmo_jax.model.logprobs import program_config
from flexolmo_jax.model.moe import bias_mask, route
from flexolmo_jax.model.transformer import pure_model


def router_probabilities(cfg: ModelConfig, params, batches: Iterable[Mapping[str, np.ndarray]]
                         ) -> dict[str, float]:
  """{expert: mean probability} over the target-weighted tokens of ``batches`` and the layers."""
  probs = layer_routing(cfg, params, batches)["probs"].mean(axis=0)
  return {name: float(v) for name, v in zip(cfg.experts, probs)}


def layer_routing(cfg: ModelConfig, params, batches: Iterable[Mapping[str, np.ndarray]]
                  ) -> dict[str, np.ndarray]:
  """Per layer, over the target-weighted tokens of ``batches``: ``probs`` [L, E] the mean router
  probability, ``logits`` [L, E] the mean router logit (negative bias included), ``spread`` [L]
  the mean over tokens of the logits' standard deviation across experts (how far apart the
  router puts the experts at all), ``top1`` [L, E] the share of tokens each expert leads, and
  ``hidden_norm`` [L] the mean norm of the residual the router reads."""
  if not cfg.is_moe:
    raise ValueError("layer_routing needs a mixture-of-experts model; this one is dense.")
  sums = _routing_sums(program_config(cfg))
  total = None
  for batch in batches:
    part = jax.device_get(sums(params, dict(batch)))
    total = part if total is None else jax.tree.map(np.add, total, part)
  if total is None or not total["count"]:
    raise ValueError("layer_routing: the batches hold no tokens.")
  count = total.pop("count")
  return {k: np.asarray(v, np.float64) / count for k, v in total.items()}


@functools.lru_cache(maxsize=16)
def _routing_sums(cfg: ModelConfig):
  """The jitted per-batch sums of ``layer_routing``, built once per model shape (the experts'
  names do not enter the program: ``program_config``), so that every domain and every model of
  that shape reuses one compiled program."""
  model = pure_model(cfg)
  mask = bias_mask(cfg.experts)

  @jax.jit
  def sums(params, batch):
    _, _, hidden = model(params, batch["decoder_input_tokens"],
                         positions_bt=batch.get("decoder_positions"),
                         segment_ids_bt=batch.get("decoder_segment_ids"), return_hidden=True)
    ffn = params["blocks"]["ffn"]
    h = hidden.router_inputs
    l, b, t, d = h.shape
    h = h.reshape(l, b * t, d)
    routing = jax.vmap(lambda x, rows, bias: route(x, rows, 1, bias, mask))(
        h, ffn["router_embedding"], ffn.get("negative_bias"))
    w = batch["decoder_loss_weights"].astype(jnp.float32).reshape(-1)
    logits = routing.logits_te                                                  # [L, T, E]
    top1 = jax.nn.one_hot(jnp.argmax(logits, axis=-1), cfg.num_experts)
    weigh = lambda v: jnp.einsum("lt...,t->l...", v, w)
    return {"probs": weigh(routing.probs_te), "logits": weigh(logits),
            "spread": weigh(jnp.std(logits, axis=-1)), "top1": weigh(top1),
            "hidden_norm": weigh(jnp.linalg.norm(h.astype(jnp.float32), axis=-1)),
            "count": jnp.sum(w)}

  return sums


def row_geometry(cfg: ModelConfig, params) -> dict[str, np.ndarray]:
  """The router rows themselves, per layer: ``norm`` [L, E], ``cosine`` [L, E, E] between every
  two experts' rows, ``negative_bias`` [L, E] (zeros where the model keeps none)."""
  rows = np.asarray(params["blocks"]["ffn"]["router_embedding"], np.float64)    # [L, E, d]
  if rows.ndim == 2:
    rows = rows[None]
  norm = np.linalg.norm(rows, axis=-1)
  unit = rows / np.maximum(norm, 1e-30)[..., None]
  bias = params["blocks"]["ffn"].get("negative_bias")
  bias = (np.zeros(norm.shape) if bias is None
          else np.minimum(np.asarray(bias, np.float64).reshape(norm.shape), 0.0))
  return {"norm": norm, "cosine": np.einsum("led,lfd->lef", unit, unit), "negative_bias": bias}
