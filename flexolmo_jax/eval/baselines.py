"""The paper's baselines over dense models continued from the public one (docs/method.md §7).

- **Model soup** (:func:`soup`): the uniform parameter average of the dense models, saved as a
  ``dense`` model.
- **BTM** (:func:`btm`, :func:`btm_scorer`): a per-token ensemble. At position t model i weighs
  ``w_i = softmax_i(-NLL_i(context) / tau)``, where ``NLL_i(context)`` is model i's summed
  negative log-likelihood of the document's tokens before t (uniform at a document's first
  token); optionally only the top-k weights are kept and renormalized. The saved ``btm``
  directory holds a manifest that names its members (paths and fingerprints), no weights.
- **BTX-lite** (:func:`btx`): the public model and the dense models upcycled into one MoE. Each
  model's FFN becomes an expert (the public model's is expert ``public``, a dense model's is named
  after it); every other weight (embeddings, attention, norms, lm_head) is the uniform average over
  all of them, public included. Router rows start from the reference's random init (one key per
  model, in the order given) and there is
  no negative bias; the router is then trained on public data only, by
  ``flexolmo tune-router --proxy-weight 0`` (no proxy sets, so no domain embedding is needed).
  The result is an ordinary merged checkpoint (its ``public/`` is the averaged trunk), so
  ``flexolmo eval``, opt-in/opt-out and ``merge --exclude`` work on it unchanged.

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
from flexolmo_jax.config import PUBLIC, validate_expert_names
from flexolmo_jax.eval import perplexity
from flexolmo_jax.train import loop, router_init


def read_members(paths: Sequence[str]) -> list[tuple[str, dict]]:
  """(directory, manifest) of each dense member, checked against the first."""
  if len(paths) < 2:
    raise ValueError(f"A baseline combines at least 2 dense models; got {len(paths)}.")
  members = []
  for path in paths:
    path = store.saved_dir(path)
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


def check_anchor(members: Sequence[tuple[str, dict]], public_path: str,
                 public_manifest: dict) -> None:
  """Every member must be continued from this public model."""
  for path, m in members:
    if m.get("anchor_fingerprint") != public_manifest["fingerprint"]:
      raise ValueError(
          f"dense model {m.get('name')!r} ({path}) was continued from public model "
          f"{str(m.get('anchor_fingerprint'))[:16]}, not from {public_path} "
          f"({public_manifest['fingerprint'][:16]}).")


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


def btx(public: str, paths: Sequence[str], out: str, top_k: int | None = None, seed: int = 0,
        overwrite: bool = False, progress=print) -> str:
  """BTX-lite: an untuned merged checkpoint (tune its router with ``tune-router
  --proxy-weight 0``). Peak memory is about three dense models plus the experts' FFNs."""
  public_path, public_manifest, cfg = merge_lib.read_public(public)
  members = read_members(paths)
  check_anchor(members, public_path, public_manifest)
  names = [m["name"] for _, m in members]
  if PUBLIC in names:
    raise ValueError(f"dense model {members[names.index(PUBLIC)][0]} is named 'public', the name "
                     "of the public expert; retrain it under its domain's name.")
  validate_expert_names([PUBLIC, *names])
  progress(f"btx: averaging the trunk of {1 + len(members)} models, FFNs become experts")
  total, ffns = None, []
  for path in [public_path] + [p for p, _ in members]:
    _, params, _ = perplexity.load_dense(path)
    params = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    ffns.append({key: params["blocks"]["ffn"].pop(dense).astype(np.float32)
                 for key, dense in merge_lib.DENSE_FFN.items()})
    total = params if total is None else jax.tree.map(np.add, total, params)
  n = 1 + len(members)
  params = jax.tree.map(lambda x: (x / n).astype(np.float32), total)
  keys = jax.random.split(jax.random.key(seed), n)
  router = np.stack([router_init.random_rows(k, cfg.n_layers, cfg.d_model) for k in keys], axis=1)
  params["blocks"]["ffn"] = {key: np.stack([f[key] for f in ffns], axis=1)
                             for key in merge_lib.FFN_KEYS}
  params["blocks"]["ffn"]["router_embedding"] = router
  del ffns, total
  experts = (PUBLIC, *sorted(names))
  order = [0] + [1 + names.index(name) for name in experts[1:]]
  params["blocks"]["ffn"] = {k: v[:, order] for k, v in params["blocks"]["ffn"].items()}
  moe_cfg = cfg.replace(experts=experts, top_k=min(merge_lib.DEFAULT_TOP_K, n)
                        if top_k is None else top_k, top_k_policy="clamp", negative_bias=False)
  spec = public_manifest["vocabulary"]["spec"]
  by_name = {m["name"]: (p, m) for p, m in members}
  return merge_lib.save_moe(
      out, moe_cfg, params, vocabulary=public_manifest["vocabulary"],
      extra_files=None if spec == "byte" else {spec: os.path.join(public_path, spec)},
      public_card={"baseline": "btx", "trunk": "uniform average", "members": [PUBLIC, *names],
                   "public_fingerprint": public_manifest["fingerprint"]},
      expert_cards={name: {"baseline": "btx", "ffn_from": {"path": os.path.abspath(p),
                                                            "fingerprint": m["fingerprint"]},
                           "dense_data_card": m.get("data_card", {})}
                    for name, (p, m) in by_name.items()},
      router_record={"source": "btx", "init": "random", "seed": seed}, overwrite=overwrite,
      progress=progress)


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
