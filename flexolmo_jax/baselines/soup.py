"""Model soup: the uniform parameter average of the dense models, saved as a ``dense`` model."""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from flexolmo_jax.baselines.members import read_members
from flexolmo_jax.checkpoint import saved, store


def soup(paths: Sequence[str], out: str, overwrite: bool = False) -> str:
  """Uniform average of the members' parameters (accumulated one member at a time)."""
  members = read_members(paths)
  total = None
  for path, _ in members:
    _, params, _ = saved.open_dense(path)
    params = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    total = params if total is None else jax.tree.map(np.add, total, params)
  first = members[0][1]
  averaged = jax.tree.map(lambda x: (x / len(members)).astype(np.float32), total)
  manifest = {"kind": "dense", "name": "soup", "config": first["config"],
              "vocabulary": first["vocabulary"], "anchor_fingerprint": first["anchor_fingerprint"],
              "fingerprint": store.fingerprint(averaged),
              "data_card": {"baseline": "soup", "members": [m["name"] for _, m in members]}}
  return store.save(out, averaged, manifest, overwrite=overwrite)
