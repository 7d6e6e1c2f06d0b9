"""Where a merged model's router sends a domain's tokens: the mean router probability of every
expert over the domain's (non-padding) tokens and over layers.

The diagnostic behind opt-out: FlexOlmo works when a domain's tokens go to the public expert and
that domain's own expert; a near-uniform row here means the experts are mixed into every domain.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from flexolmo_jax.config import ModelConfig
from flexolmo_jax.model.moe import bias_mask, route
from flexolmo_jax.model.transformer import pure_model


def router_probabilities(cfg: ModelConfig, params, batches: Iterable[Mapping[str, np.ndarray]]
                         ) -> dict[str, float]:
  """{expert: mean probability} over the target-weighted tokens of ``batches``."""
  if not cfg.is_moe:
    raise ValueError("router_probabilities needs a mixture-of-experts model; this one is dense.")
  model = pure_model(cfg)
  mask = bias_mask(cfg.experts)

  @jax.jit
  def mass(params, batch):
    _, _, hidden = model(params, batch["decoder_input_tokens"],
                         positions_bt=batch.get("decoder_positions"),
                         segment_ids_bt=batch.get("decoder_segment_ids"), return_hidden=True)
    ffn = params["blocks"]["ffn"]
    h = hidden.router_inputs                                                  # [L, B, T, d]
    l, b, t, d = h.shape
    # The MoE layer's own routing (negative bias included), one layer at a time.
    per_layer = lambda x, rows, bias: route(x, rows, 1, bias, mask).probs_te
    probs = jax.vmap(per_layer)(h.reshape(l, b * t, d), ffn["router_embedding"],
                                ffn.get("negative_bias")).mean(axis=0)        # [B*T, E]
    w = batch["decoder_loss_weights"].astype(jnp.float32).reshape(-1)
    return probs.T @ w, jnp.sum(w)

  total, count = np.zeros(cfg.num_experts), 0.0
  for batch in batches:
    m, n = jax.device_get(mass(params, dict(batch)))
    total, count = total + m, count + float(n)
  if not count:
    raise ValueError("router_probabilities: the batches hold no tokens.")
  return {name: float(v / count) for name, v in zip(cfg.experts, total)}
