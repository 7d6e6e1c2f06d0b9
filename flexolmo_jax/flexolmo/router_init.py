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
- ``classifier``: each owner's row and negative bias make a linear classifier of its own tokens
  against the public model's, at every layer's router input (docs/method.md §5). r_pub is zero, so
  an owner's logit is its log-odds against the public data, and the merged router's softmax over
  [0, s_1, ..., s_n] is the posterior over "public or owner i" that these one-against-public
  classifiers compose into. An owner needs only its own tokens and the public model's token
  statistics (``token_mean``, ``token_cov`` in ``public_embedding.npz``): no other owner's data.

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

MODES = ("shared", "per_layer", "random", "classifier")
EMBEDDING_FILE = "public_embedding.npz"   # pretrain writes it beside the public parameters
DOMAIN_EMBEDDING_FILE = "domain_embedding.npz"   # train-expert writes it into the artifact


def domain_embedding(model: PureModel, params, batches: Iterable[Mapping[str, np.ndarray]],
                     num_documents: int = 1000, moments: bool = False) -> dict[str, np.ndarray]:
  """{"shared": [d], "per_layer": [L, d], "documents": n} over the first ``num_documents``;
  with ``moments`` also the token statistics of every layer's router input over the batches
  read: "token_mean" [L, d], "token_cov" [L, d, d] and "tokens" (the ``classifier`` init)."""
  embed = segment_embedder(model, moments)
  shared, per_layer, seen = [], [], 0
  sums = None
  for batch in batches:
    final, layers, valid, *batch_moments = jax.device_get(embed(
        params, batch["decoder_input_tokens"], batch["decoder_positions"],
        batch["decoder_segment_ids"]))
    if moments:
      got = [np.asarray(a, np.float64) for a in batch_moments[0]]
      sums = got if sums is None else [a + b for a, b in zip(sums, got)]
    keep = np.flatnonzero(valid)[: num_documents - seen]
    shared.append(final[keep])
    per_layer.append(layers[:, keep])
    seen += len(keep)
    if seen >= num_documents:
      break
  if not seen:
    raise ValueError("No documents to compute a domain embedding from (the data is empty).")
  out = {"shared": np.concatenate(shared).mean(axis=0),
         "per_layer": np.concatenate(per_layer, axis=1).mean(axis=1),
         "documents": np.int64(seen)}
  if moments:
    total, outer, count = sums
    mean = total / count
    out.update(token_mean=mean.astype(np.float32), tokens=np.int64(count),
               token_cov=(outer / count - mean[:, :, None] * mean[:, None, :]).astype(np.float32))
  return out


def classifier_rows(own: Mapping[str, np.ndarray], public: Mapping[str, np.ndarray],
                    public_odds: float, ridge: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
  """(w [L, d], b [L]): per layer, the linear discriminant of the owner's tokens against the
  public tokens, ``s(x) = w.x + b``, the log-odds "owner" vs "public" of a router input ``x``.

  Both classes are Gaussians with the average of their two covariances (Fisher's discriminant),
  made well-conditioned by adding ``ridge`` times its mean variance to the diagonal.
  ``public_odds`` is the prior odds of a token being public: above 1 the owner's expert must
  earn its weight, as the paper's negative bias intends; ``b`` carries ``-log(public_odds)``.
  The merge can add such a prior for every expert at once (``merge --expert-bias``).
  """
  for name, stats in (("owner", own), ("public", public)):
    missing = [k for k in ("token_mean", "token_cov") if k not in stats]
    if missing:
      raise KeyError(f"The {name}'s domain embedding has no {missing[0]}: the classifier init "
                     "needs token statistics (a public model saved by this version of pretrain).")
  m_o, m_p = (np.asarray(s["token_mean"], np.float64) for s in (own, public))
  if m_o.shape != m_p.shape:
    raise ValueError(f"Token statistics of shape {m_o.shape} (owner) and {m_p.shape} (public) "
                     "differ: they come from different models.")
  cov = (np.asarray(own["token_cov"], np.float64) + np.asarray(public["token_cov"], np.float64)) / 2
  d = cov.shape[-1]
  cov = cov + ridge * (np.trace(cov, axis1=1, axis2=2) / d)[:, None, None] * np.eye(d)
  w = np.linalg.solve(cov, (m_o - m_p)[..., None])[..., 0]
  b = -np.sum(w * (m_o + m_p) / 2, axis=-1) - np.log(public_odds)
  return w.astype(np.float32), b.astype(np.float32)


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
  if mode == "classifier":
    raise ValueError("router init 'classifier' rows come from classifier_rows (two embeddings).")
  if mode == "shared":
    return np.broadcast_to(np.asarray(embedding["shared"], np.float32), (n_layers, d_model)).copy()
  return np.asarray(embedding["per_layer"], np.float32)


def public_rows(mode: str, public_path: str, fingerprint: str, n_layers: int,
                d_model: int) -> np.ndarray:
  """r_pub [L, d], the same for every owner: from the public model's ``public_embedding.npz``,
  or (``random``) drawn from a key derived from the anchor fingerprint; zero for ``classifier``
  (the public expert is the reference class every owner's log-odds are taken against)."""
  if mode == "classifier":
    return np.zeros((n_layers, d_model), np.float32)
  if mode == "random":
    return random_rows(jax.random.key(int(fingerprint[:8], 16)), n_layers, d_model)
  return rows_for(mode, public_embedding(public_path), n_layers, d_model)


def public_embedding(public_path: str) -> dict[str, np.ndarray]:
  """The public model's ``public_embedding.npz``: its domain embedding and token statistics."""
  path = os.path.join(public_path, EMBEDDING_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path} is missing: the public model carries no public domain embedding, so the router "
        "cannot be initialized from embeddings; use router_init='random' (--router-init random).")
  with np.load(path, allow_pickle=False) as f:
    return dict(f)
