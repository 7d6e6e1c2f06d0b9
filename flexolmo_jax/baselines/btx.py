"""BTX-lite: the public model and the dense models upcycled into one MoE.

Each model's FFN becomes an expert (the public model's is expert ``public``, a dense model's is
named after it); every other weight (embeddings, attention, norms, lm_head) is the uniform average
over all of them, public included. Router rows start from the reference's random init (one key
per model, in the order given) and there is no negative bias; the router is then trained on
public data only, by ``flexolmo tune-router --proxy-weight 0`` (no proxy sets, so no domain
embedding is needed). The result is an ordinary merged checkpoint (its ``public/`` is the
averaged trunk), so ``flexolmo eval``, opt-in/opt-out and ``merge --exclude`` work on it
unchanged.
"""
from __future__ import annotations

import os
from typing import Sequence

import jax
import numpy as np

from flexolmo_jax import experts as experts_lib
from flexolmo_jax.baselines.members import check_anchor, read_members
from flexolmo_jax.checkpoint import merged_model, saved
from flexolmo_jax.data import vocabularies
from flexolmo_jax.experts import PUBLIC
from flexolmo_jax.flexolmo import merge as merge_lib
from flexolmo_jax.flexolmo import router_init


def btx(public: str, paths: Sequence[str], out: str, top_k: int | None = None, seed: int = 0,
        overwrite: bool = False, progress=print) -> str:
  """BTX-lite: an untuned merged checkpoint (tune its router with ``tune-router
  --proxy-weight 0``). Peak memory is about three dense models plus the experts' FFNs."""
  public_path, public_manifest, cfg = saved.open_public(public, verify_parameters=True)
  members = read_members(paths)
  check_anchor(members, public_path, public_manifest)
  names = [m["name"] for _, m in members]
  if PUBLIC in names:
    raise ValueError(f"dense model {members[names.index(PUBLIC)][0]} is named 'public', the name "
                     "of the public expert; retrain it under its domain's name.")
  experts_lib.validate([PUBLIC, *names])
  progress(f"btx: averaging the trunk of {1 + len(members)} models, FFNs become experts")
  total, ffns = None, []
  for path in [public_path] + [p for p, _ in members]:
    _, params, _ = saved.open_dense(path)
    params = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    ffns.append({key: params["blocks"]["ffn"].pop(dense).astype(np.float32)
                 for key, dense in merged_model.DENSE_FFN.items()})
    total = params if total is None else jax.tree.map(np.add, total, params)
  n = 1 + len(members)
  params = jax.tree.map(lambda x: (x / n).astype(np.float32), total)
  keys = jax.random.split(jax.random.key(seed), n)
  router = np.stack([router_init.random_rows(k, cfg.n_layers, cfg.d_model) for k in keys], axis=1)
  params["blocks"]["ffn"] = {key: np.stack([f[key] for f in ffns], axis=1)
                             for key in merged_model.FFN_KEYS}
  params["blocks"]["ffn"]["router_embedding"] = router
  del ffns, total
  experts = (PUBLIC, *sorted(names))
  order = [0] + [1 + names.index(name) for name in experts[1:]]
  params["blocks"]["ffn"] = {k: v[:, order] for k, v in params["blocks"]["ffn"].items()}
  moe_cfg = cfg.replace(experts=experts, top_k=min(merge_lib.DEFAULT_TOP_K, n)
                        if top_k is None else top_k, top_k_policy="clamp", negative_bias=False)
  vocabulary_files = vocabularies.saved_files(saved.vocabulary_spec(public_path,
                                                                   public_manifest))[1]
  by_name = {m["name"]: (p, m) for p, m in members}
  return merge_lib.save_moe(
      out, moe_cfg, params, vocabulary=public_manifest["vocabulary"],
      extra_files=vocabulary_files,
      public_card={"baseline": "btx", "trunk": "uniform average", "members": [PUBLIC, *names],
                   "public_fingerprint": public_manifest["fingerprint"]},
      expert_cards={name: {"baseline": "btx", "ffn_from": {"path": os.path.abspath(p),
                                                            "fingerprint": m["fingerprint"]},
                           "dense_data_card": m.get("data_card", {})}
                    for name, (p, m) in by_name.items()},
      router_record={"source": "btx", "init": "random", "seed": seed}, overwrite=overwrite,
      progress=progress)
