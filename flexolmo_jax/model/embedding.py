"""Document embeddings from a model's own hidden states (the domain embedding's unit).

A document's embedding is the mean over its tokens of a hidden state, L2-normalized as an
embedder's output would be. A "document" is a packed segment: a document longer than the
sequence length counts once per chunk.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from flexolmo_jax.model.transformer import PureModel


def segment_embeddings(hidden_btd, segment_ids_bt):
  """L2-normalized mean over each packed segment -> ([B*T, d], [B*T] valid), segment order."""
  b, t, d = hidden_btd.shape
  ids = (jnp.arange(b)[:, None] * t + segment_ids_bt).reshape(-1)     # segment 0 is padding
  valid_tok = (segment_ids_bt > 0).reshape(-1).astype(jnp.float32)
  h = hidden_btd.reshape(-1, d).astype(jnp.float32) * valid_tok[:, None]
  sums = jax.ops.segment_sum(h, ids, num_segments=b * t)
  counts = jax.ops.segment_sum(valid_tok, ids, num_segments=b * t)
  mean = sums / jnp.maximum(counts, 1.0)[:, None]
  norm = jnp.linalg.norm(mean, axis=-1, keepdims=True)
  return mean / jnp.maximum(norm, 1e-12), counts > 0


def token_moments(router_inputs_lbtd, segment_ids_bt):
  """(sum [L, d], sum of x x^T [L, d, d], count) of every layer's router input over the real
  (non-padding) tokens, in fp32."""
  x = router_inputs_lbtd.astype(jnp.float32)
  w = (segment_ids_bt > 0).astype(jnp.float32)
  return (jnp.einsum("lbtd,bt->ld", x, w), jnp.einsum("lbtd,lbte,bt->lde", x, x, w), w.sum())


def segment_embedder(model: PureModel, moments: bool = False):
  """jitted ``(params, tokens, positions, segments) -> (final [B*T, d], per_layer [L, B*T, d],
  valid [B*T])``: every packed segment's normalized embeddings (segment_embeddings' order); with
  ``moments`` a fourth element, the batch's :func:`token_moments`, from the same forward pass."""

  @jax.jit
  def embed(params, tokens, positions, segments):
    _, _, hidden = model(params, tokens, positions_bt=positions, segment_ids_bt=segments,
                         return_hidden=True)
    final, valid = segment_embeddings(hidden.final, segments)
    per_layer = jax.vmap(lambda h: segment_embeddings(h, segments)[0])(hidden.router_inputs)
    if moments:
      return final, per_layer, valid, token_moments(hidden.router_inputs, segments)
    return final, per_layer, valid
  return embed
