"""Opening anything saved: the one place that resolves a path, reads its manifest's kind and
returns what the rest of the code computes with.

A path may name a saved directory or the run directory that holds it (``<run>/model``,
``<run>/expert``, ``<run>/merged``); every manifest is verified on read (``store``).

- :func:`open_public`: the public model a data owner trains against or a merge anchors on;
- :func:`open_dense`: a public or ``dense`` model with its parameters;
- :func:`open_saved`: a public, dense or merged model (experts opted in or out), ready to run;
- :func:`vocabulary`: the vocabulary any saved model (a BTM ensemble too) was trained with.
"""
from __future__ import annotations

import os

from flexolmo_jax.checkpoint import merged_model, store
from flexolmo_jax.config import ModelConfig
from flexolmo_jax.model.transformer import pure_model

DENSE_KINDS = ("public", "dense")


def open_public(path: str, verify_parameters: bool = False) -> tuple[str, dict, ModelConfig]:
  """(directory, manifest, config) of a dense public model. With ``verify_parameters`` its
  fingerprint is recomputed from the parameters: an expert is merged only with the very
  parameters it was trained against, whatever the manifest says."""
  path = store.saved_dir(path)
  manifest = store.read_manifest(path)
  if manifest.get("kind") != "public":
    raise ValueError(f"{path} is a {manifest.get('kind')!r} checkpoint, not a dense public model; "
                     "pass the output of `flexolmo pretrain` (or an imported dense model).")
  cfg = store.config_from_json(manifest["config"], os.path.join(path, store.MANIFEST))
  if cfg.is_moe:
    raise ValueError(f"{path}: the model has experts {list(cfg.experts)}; a public model is "
                     "dense.")
  if verify_parameters:
    store.check_fingerprint(path, manifest)
  return path, manifest, cfg


def vocabulary_spec(path: str, manifest: dict) -> str:
  """``byte`` or the path of the SentencePiece model saved beside a public model."""
  spec = manifest["vocabulary"]["spec"]
  return spec if spec == "byte" else os.path.join(path, spec)


def open_dense(path: str, dtype: str | None = None) -> tuple[ModelConfig, dict, dict]:
  """(config, params, manifest) of a ``public`` or ``dense`` model directory."""
  path = store.saved_dir(path)
  manifest = store.read_manifest(path)
  if manifest.get("kind") not in DENSE_KINDS:
    raise ValueError(f"{path} holds a {manifest.get('kind')!r} checkpoint, not a dense model.")
  cfg = store.config_from_json(manifest["config"], os.path.join(path, store.MANIFEST))
  if dtype:
    cfg = cfg.replace(dtype=dtype)
  store.recorded_files(path, manifest)
  params = store.load_params(path, pure_model(cfg).abstract.to_pure_dict())
  return cfg, params, manifest


def open_saved(path: str, experts=None, exclude=None, dtype: str | None = None
               ) -> tuple[ModelConfig, dict, dict]:
  """(config, params, manifest) of a public, dense or merged model (experts opted in or out)."""
  path = store.saved_dir(path)
  manifest = store.read_manifest(path)
  kind = manifest.get("kind")
  if kind != merged_model.KIND and (experts or exclude):
    raise ValueError(f"--experts / --exclude apply to merged models; {path} is {kind!r}.")
  if kind == merged_model.KIND:
    cfg, params = merged_model.load_merged(path, experts, exclude, dtype=dtype)
    return cfg, params, manifest
  if kind in DENSE_KINDS:
    return open_dense(path, dtype)
  raise ValueError(f"{path}: a {kind!r} checkpoint cannot be run on its own"
                   + ("; merge it with its public model first (flexolmo merge)."
                      if kind == "expert" else "."))


def vocabulary(path: str):
  """The vocabulary a saved model (any kind) was trained with."""
  path = store.saved_dir(path)
  manifest = store.read_manifest(path)
  if manifest["kind"] == "btm":
    return vocabulary(manifest["members"][0]["path"])
  if manifest["kind"] == merged_model.KIND:
    path = os.path.join(path, merged_model.PUBLIC_DIR)
  # Imported here: seqio brings TensorFlow (10 s), which opening a model for merging, export or
  # inspection does not need.
  from flexolmo_jax.data import vocabularies

  return vocabularies.load(vocabulary_spec(path, manifest))
