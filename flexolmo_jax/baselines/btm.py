"""BTM: a per-token ensemble of the dense models.

At position t model i weighs ``w_i = softmax_i(-NLL_i(context) / tau)``, where
``NLL_i(context)`` is model i's summed negative log-likelihood of the document's tokens before t
(uniform at a document's first token); optionally only the top-k weights are kept and
renormalized. The saved ``btm`` directory holds a manifest that names its members (paths and
fingerprints), no weights.
"""
from __future__ import annotations

import os
import shutil
from typing import Sequence

import jax
import jax.numpy as jnp

from flexolmo_jax.baselines.members import read_members
from flexolmo_jax.checkpoint import saved, store
from flexolmo_jax.model import logprobs
from flexolmo_jax.model.transformer import pure_model, run_on_batch


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


def btm_scorer(path: str, manifest: dict, dtype: str | None = None) -> logprobs.Scorer:
  models = []
  for member in manifest["members"]:
    cfg, params, m = saved.open_dense(member["path"], dtype)
    if m["fingerprint"] != member["fingerprint"]:
      raise ValueError(f"{path}: member {member['name']!r} at {member['path']} has changed since "
                       "the ensemble was built (fingerprint mismatch).")
    models.append(params)
  model = pure_model(cfg)
  tau, top_k = manifest["tau"], manifest.get("top_k")

  @jax.jit
  def score(all_params, batch):
    logps = [logprobs.target_logprobs(run_on_batch(model, p, batch)[0],
                                        batch["decoder_target_tokens"]) for p in all_params]
    return ensemble_logprobs(jnp.stack(logps), batch["decoder_positions"], tau, top_k)

  return lambda batch: score(models, batch)
