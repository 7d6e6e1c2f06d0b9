"""The paper's baselines over dense models continued from the public one (spec section 7).

- **Model soup** (:func:`soup`): the uniform parameter average of the dense models, saved as a
  ``dense`` model.
- **BTM** (:func:`btm`, :func:`btm_scorer`): a per-token ensemble. At position t model i weighs
  ``w_i = softmax_i(-NLL_i(context) / tau)``, where ``NLL_i(context)`` is model i's summed
  negative log-likelihood of the document's tokens before t (uniform at a document's first
  token); optionally only the top-k weights are kept and renormalized. The saved ``btm``
  directory holds a manifest that names its members (paths and fingerprints), no weights.

Every member must be continued from the same public model (same anchor fingerprint, config and
vocabulary); a mismatch is refused naming the member.
"""
from __future__ import annotations

import os
import shutil
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flexolmo_jax.checkpoint import merge as merge_lib
from flexolmo_jax.checkpoint import store
from flexolmo_jax.eval import perplexity
from flexolmo_jax.train import loop


def read_members(paths: Sequence[str]) -> list[tuple[str, dict]]:
  """(directory, manifest) of each dense member, checked against the first."""
  if len(paths) < 2:
    raise ValueError(f"A baseline combines at least 2 dense models; got {len(paths)}.")
  members = []
  for path in paths:
    path = merge_lib.resolve(path, "model")
    manifest = store.read_manifest(path, "dense")
    if members:
      first_path, first = members[0]
      for key in ("anchor_fingerprint", "config", "vocabulary"):
        if manifest.get(key) != first.get(key):
          raise ValueError(f"dense model {manifest.get('name')!r} ({path}) has a different "
                           f"{key} from {first.get('name')!r} ({first_path}).")
    if any(m.get("name") == manifest.get("name") for _, m in members):
      raise ValueError(f"Two dense models are named {manifest.get('name')!r}.")
    members.append((path, manifest))
  return members


def soup(paths: Sequence[str], out: str, overwrite: bool = False) -> str:
  """Uniform average of the members' parameters (accumulated one member at a time)."""
  members = read_members(paths)
  total = None
  for path, _ in members:
    _, params, _ = perplexity.load_dense(path)
    params = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    total = params if total is None else jax.tree.map(np.add, total, params)
  first = members[0][1]
  averaged = jax.tree.map(lambda x: (x / len(members)).astype(np.float32), total)
  manifest = {"kind": "dense", "name": "soup", "config": first["config"],
              "vocabulary": first["vocabulary"], "anchor_fingerprint": first["anchor_fingerprint"],
              "fingerprint": store.fingerprint(averaged),
              "data_card": {"baseline": "soup", "members": [m["name"] for _, m in members]}}
  return store.save(out, averaged, manifest, overwrite=overwrite)


def btm(paths: Sequence[str], out: str, tau: float = 1.0, top_k: int | None = None,
        overwrite: bool = False) -> str:
  """Writes the ensemble's manifest (its members by path and fingerprint)."""
  if tau <= 0:
    raise ValueError(f"BTM temperature tau={tau} must be > 0.")
  members = read_members(paths)
  if top_k is not None and not 1 <= top_k <= len(members):
    raise ValueError(f"BTM top_k={top_k} must be in [1, {len(members)}].")
  out, partial = store.begin(out, overwrite)
  try:
    store.finish(partial, out, {
        "kind": "btm", "tau": tau, "top_k": top_k,
        "vocabulary": members[0][1]["vocabulary"],
        "members": [{"name": m["name"], "path": os.path.abspath(p),
                     "fingerprint": m["fingerprint"]} for p, m in members]})
  except BaseException:
    shutil.rmtree(partial, ignore_errors=True)
    raise
  return out


def ensemble_logprobs(logp_mbt, positions_bt, tau: float, top_k: int | None):
  """[B, T] log-probabilities of the BTM mixture from the members' [M, B, T] ones."""
  nll = -logp_mbt
  before = jnp.cumsum(nll, axis=-1) - nll                     # summed NLL of earlier tokens
  t = jnp.arange(nll.shape[-1])
  start = jnp.broadcast_to(t - positions_bt, nll.shape[1:])   # first token of the document
  context = before - jnp.take_along_axis(before, start[None].repeat(nll.shape[0], 0), -1)
  scores = -context / tau
  if top_k is not None and top_k < nll.shape[0]:
    kth = jnp.sort(scores, axis=0)[-top_k]
    scores = jnp.where(scores >= kth, scores, -jnp.inf)
  log_w = jax.nn.log_softmax(scores, axis=0)
  return jax.nn.logsumexp(log_w + logp_mbt, axis=0)


def btm_scorer(path: str, manifest: dict, dtype: str | None = None) -> perplexity.Scorer:
  from flexolmo_jax.model.transformer import pure_model

  models = []
  for member in manifest["members"]:
    cfg, params, m = perplexity.load_dense(member["path"], dtype)
    if m["fingerprint"] != member["fingerprint"]:
      raise ValueError(f"{path}: member {member['name']!r} at {member['path']} has changed since "
                       "the ensemble was built (fingerprint mismatch).")
    models.append(params)
  model = pure_model(cfg)
  tau, top_k = manifest["tau"], manifest.get("top_k")

  @jax.jit
  def score(all_params, batch):
    logps = [perplexity.target_logprobs(loop.run_on_batch(model, p, batch)[0],
                                        batch["decoder_target_tokens"]) for p in all_params]
    return ensemble_logprobs(jnp.stack(logps), batch["decoder_positions"], tau, top_k)

  return lambda batch: score(models, batch)
