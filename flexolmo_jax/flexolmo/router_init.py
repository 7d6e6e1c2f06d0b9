"""Router rows from domain embeddings (docs/method.md §5).

The paper embeds 1000 documents of a domain with an off-the-shelf embedder and uses their mean as
that expert's router row in every layer. Its embedder's width equals d_model; ours may not, so we
use the public model's own hidden states (the paper's "Public" init): a document's embedding is
the mean over its tokens of a hidden state, L2-normalized as an embedder's output would be; the
domain embedding is the mean over documents (not re-normalized, so its norm is below 1).

- ``shared`` (the paper's scheme): the final-normed hidden state that feeds the lm_head; the same
  vector initializes the row in every layer.
- ``per_layer``: layer l's row is the mean of the residual that layer's router actually sees.
- ``random``: the reference code's fallback, a truncated normal (std 0.002, cut to [-0.006, 0]).

A "document" is a packed segment: a document longer than the sequence length counts once per
chunk.
"""
from __future__ import annotations

import os
from typing import Iterable, Mapping

import jax
import numpy as np

from flexolmo_jax.model.embedding import segment_embedder
from flexolmo_jax.model.transformer import PureModel

MODES = ("shared", "per_layer", "random")
EMBEDDING_FILE = "public_embedding.npz"   # pretrain writes it beside the public parameters
DOMAIN_EMBEDDING_FILE = "domain_embedding.npz"   # train-expert writes it into the artifact


def domain_embedding(model: PureModel, params, batches: Iterable[Mapping[str, np.ndarray]],
                     num_documents: int = 1000) -> dict[str, np.ndarray]:
  """{"shared": [d], "per_layer": [L, d], "documents": n} over the first ``num_documents``."""
  embed = segment_embedder(model)
  shared, per_layer, seen = [], [], 0
  for batch in batches:
    final, layers, valid = jax.device_get(embed(
        params, batch["decoder_input_tokens"], batch["decoder_positions"],
        batch["decoder_segment_ids"]))
    keep = np.flatnonzero(valid)[: num_documents - seen]
    shared.append(final[keep])
    per_layer.append(layers[:, keep])
    seen += len(keep)
    if seen >= num_documents:
      break
  if not seen:
    raise ValueError("No documents to compute a domain embedding from (the data is empty).")
  return {"shared": np.concatenate(shared).mean(axis=0),
          "per_layer": np.concatenate(per_layer, axis=1).mean(axis=1),
          "documents": np.int64(seen)}


def random_rows(key, n_layers: int, d_model: int) -> np.ndarray:
  """The reference fallback: truncated normal, std 0.002, in [-0.006, 0], per layer."""
  return np.asarray(0.002 * jax.random.truncated_normal(key, -3.0, 0.0, (n_layers, d_model)))


def rows_for(mode: str, embedding: Mapping[str, np.ndarray] | None, n_layers: int, d_model: int,
             key=None) -> np.ndarray:
  """[L, d] router rows for ``mode`` from a domain embedding (or random)."""
  if mode not in MODES:
    raise ValueError(f"router init {mode!r}: choose one of {MODES}.")
  if mode == "random":
    return random_rows(key, n_layers, d_model)
  if mode == "shared":
    return np.broadcast_to(np.asarray(embedding["shared"], np.float32), (n_layers, d_model)).copy()
  return np.asarray(embedding["per_layer"], np.float32)


def public_rows(mode: str, public_path: str, fingerprint: str, n_layers: int,
                d_model: int) -> np.ndarray:
  """r_pub [L, d], the same for every owner: from the public model's ``public_embedding.npz``,
  or (``random``) drawn from a key derived from the anchor fingerprint."""
  if mode == "random":
    return random_rows(jax.random.key(int(fingerprint[:8], 16)), n_layers, d_model)
  path = os.path.join(public_path, EMBEDDING_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path} is missing: the public model carries no public domain embedding, so r_pub "
        "cannot be built from embeddings; use router_init='random' (--router-init random).")
  with np.load(path) as f:
    return rows_for(mode, dict(f), n_layers, d_model)
