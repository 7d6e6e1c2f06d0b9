"""The router row's domain embedding under DP (docs/method.md §9, DP note).

The non-DP embedding (flexolmo/router_init.py) is a mean over the owner's documents of their
L2-normalized hidden-state means: it reads the owner's data, and it is released (as the router
row, and in the artifact for router tuning). Under DP it is one of two things:

- ``noised_mean``: every training document (its first ``seq_len`` tokens) gives its ``shared``
  vector [d] and its ``per_layer`` vectors [L, d], each of norm exactly 1, so one document moves
  their concatenated sum by at most sqrt(1 + L) (add or remove; twice that when replaced). The sum
  gets N(0, (sigma_r * sqrt(1 + L))^2) noise per entry and is divided by the public document
  count N: a Gaussian mechanism with noise multiplier sigma_r, composed into the run's epsilon
  (privacy/accounting.py).
- ``proxy``: the same embedding of public text the owner chose as resembling its data; it
  reads none of the owner's documents and costs nothing.
"""
from __future__ import annotations

import jax
import numpy as np

from flexolmo_jax.model.embedding import segment_embedder
from flexolmo_jax.model.transformer import PureModel
from flexolmo_jax.privacy import documents as documents_lib


def sensitivity(n_layers: int) -> float:
  """L2 norm of one document's contribution (``shared`` plus ``per_layer``) to the sum."""
  return float(np.sqrt(1 + n_layers))


def embedding_sums(model: PureModel, params, docs: documents_lib.Documents,
                   batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
  """(sum over documents of ``shared`` [d], of ``per_layer`` [L, d]), each document's first row."""
  embed = segment_embedder(model)
  shared, per_layer = 0.0, 0.0
  for start in range(0, docs.count, batch_size):
    idx = np.arange(start, min(start + batch_size, docs.count))
    ex = documents_lib.examples(docs, idx, pad_to=batch_size)
    first = {k: v[:, 0] for k, v in ex.items() if k != documents_lib.WEIGHT_KEY}
    f, layers, valid = jax.device_get(embed(params, first["decoder_input_tokens"],
                                            first["decoder_positions"],
                                            first["decoder_segment_ids"]))
    # Segment ids are 1 on every row: entry b * T + 1 is row b's document.
    rows = np.arange(batch_size) * first["decoder_input_tokens"].shape[1] + 1
    f, layers, valid = f[rows], layers[:, rows], valid[rows]
    real = ex[documents_lib.WEIGHT_KEY].astype(bool) & valid
    shared = shared + f[real].sum(axis=0)
    per_layer = per_layer + layers[:, real].sum(axis=1)
  return np.asarray(shared, np.float64), np.asarray(per_layer, np.float64)


def noised_mean(model: PureModel, params, docs: documents_lib.Documents, n_layers: int,
                noise_multiplier: float, seed: int) -> dict[str, np.ndarray]:
  """The Gaussian-mechanism domain embedding: {"shared", "per_layer", "documents"}."""
  shared, per_layer = embedding_sums(model, params, docs)
  rng = np.random.default_rng([seed, 0x40D7])
  std = noise_multiplier * sensitivity(n_layers)
  shared = shared + rng.normal(0.0, std, shared.shape)
  per_layer = per_layer + rng.normal(0.0, std, per_layer.shape)
  return {"shared": (shared / docs.count).astype(np.float32),
          "per_layer": (per_layer / docs.count).astype(np.float32),
          "documents": np.int64(docs.count)}
