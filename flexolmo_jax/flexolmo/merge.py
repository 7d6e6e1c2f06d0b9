"""``flexolmo merge``: the public model plus named experts as one MoE checkpoint (docs/method.md §6).

The layout it writes is ``checkpoint/merged.py``'s. The model's order is ``public`` first, then
the other names sorted, so the order of ``--expert`` flags never matters.

Merging never decodes the experts' weights. The inputs are checked by their manifests (kind,
anchor fingerprint, shape-defining config, vocabulary, the public router row each expert trained
against), the public model's fingerprint is recomputed from its parameters (one leaf at a time),
every expected leaf is checked in Orbax's metadata, and every byte is checked against the SHA-256s
the manifests record, computed while the files are copied: a full Orbax restore and re-save
costs about 10x a file copy (bench/RESULTS.md), and the bytes being identical is what makes the
merge exact. Peak memory is a copy buffer per thread plus the router rows. The output is written
under ``<out>.partial-<pid>`` and renamed into place when complete.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any, Mapping, Sequence

import numpy as np
import orbax.checkpoint as ocp

from flexolmo_jax import distributed
from flexolmo_jax import experts as experts_lib
from flexolmo_jax.checkpoint import integrity, merged_model, saved, store
from flexolmo_jax.config import ModelConfig
from flexolmo_jax.data import vocabularies
from flexolmo_jax.experts import PUBLIC
from flexolmo_jax.flexolmo import router_init
from flexolmo_jax.privacy import accounting

DEFAULT_TOP_K = 4   # the paper's 8-expert table; quality plateaus near 4 active experts
# ModelConfig fields every expert must share with the public model.
SHAPE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff",
                "max_seq_len", "rope_theta", "norm_eps", "param_dtype")


@dataclasses.dataclass
class Expert:
  name: str
  path: str
  manifest: dict
  router: np.ndarray                 # [L, d]
  negative_bias: np.ndarray | None   # [L]


def router_fingerprint(row) -> str:
  return store.fingerprint({"public_router": np.asarray(row, np.float32)})


def _check_leaves(path: str, cfg: ModelConfig, has_bias: bool, what: str) -> None:
  params = store.params_dir(path)
  try:
    tree = ocp.StandardCheckpointer().metadata(params).item_metadata.tree
  except Exception as e:   # noqa: BLE001 (Orbax raises many kinds for a broken directory)
    raise ValueError(f"{what}: cannot read the Orbax metadata of {params}: {e}") from e
  want = merged_model.expected_shapes(cfg)
  if not has_bias:
    want.pop("negative_bias")
  got = {k: tuple(v.shape) for k, v in tree.items()}
  if got != want:
    raise ValueError(f"{what}: {params} holds {got}, expected {want} for this config.")


def read_expert(path: str, public_manifest: dict, public_cfg: ModelConfig,
                public_path: str) -> Expert:
  """An expert artifact checked against the public model; errors name the expert and file."""
  path = store.saved_dir(path)
  manifest = store.read_manifest(path)
  name = manifest.get("name", "?")
  what = f"expert {name!r} ({path})"
  if manifest.get("kind") != "expert":
    raise ValueError(f"{path} holds a {manifest.get('kind')!r} checkpoint, not an expert artifact.")
  if manifest.get("anchor_fingerprint") != public_manifest["fingerprint"]:
    raise ValueError(
        f"{what} was trained against public model {manifest.get('anchor_fingerprint', '?')[:16]}, "
        f"but {public_path} is {public_manifest['fingerprint'][:16]}: merge it with the public "
        "model it was trained against.")
  cfg = store.config_from_json(manifest["config"], os.path.join(path, store.MANIFEST))
  diff = [f"{k}={getattr(cfg, k)} (public {getattr(public_cfg, k)})" for k in SHAPE_FIELDS
          if getattr(cfg, k) != getattr(public_cfg, k)]
  if diff:
    raise ValueError(f"{what} has a different config from the public model: {', '.join(diff)}.")
  if manifest.get("vocabulary") != public_manifest.get("vocabulary"):
    raise ValueError(f"{what} was trained with the vocabulary "
                     f"{vocabularies.describe(manifest.get('vocabulary') or {})}, the public "
                     f"model {public_path} has "
                     f"{vocabularies.describe(public_manifest.get('vocabulary') or {})}.")
  if cfg.experts != (PUBLIC, name):
    raise ValueError(f"{what}: its config names experts {list(cfg.experts)}, expected "
                     f"['public', {name!r}].")
  store.recorded_files(path, manifest)         # every file present at its size
  _check_leaves(path, cfg, cfg.negative_bias, what)
  small = merged_model.restore_small(
      path, ("router", "negative_bias") if cfg.negative_bias else ("router",),
                         cfg)
  return Expert(name, path, manifest, small["router"], small.get("negative_bias"))


def _router_mode(expert: Expert) -> str:
  return expert.manifest.get("data_card", {}).get("expert_config", {}).get("router_init", "shared")


@dataclasses.dataclass
class Source:
  """What a merge reads: the public model, the experts, and optionally an existing router."""

  public_path: str
  public_manifest: dict
  public_cfg: ModelConfig
  experts: list[Expert]
  router: dict[str, np.ndarray] | None = None    # from a merged input (tuned rows are kept)
  top_k: int | None = None          # a merged input's top-k, None when it routes to all experts


def read_sources(public: str, experts: Sequence[str]) -> Source:
  """The public model (or a merged checkpoint, whose experts come along) plus expert artifacts."""
  public = store.saved_dir(public)
  manifest = store.read_manifest(public)
  merged_router, merged_top_k = None, None
  paths = list(experts)
  if manifest.get("kind") == merged_model.KIND:
    had = manifest["config"].get("top_k")
    merged_top_k = had if isinstance(had, int) and had < len(manifest["experts"]) else None
    paths = [os.path.join(public, merged_model.EXPERTS_DIR, n) for n in manifest["experts"]
             if n != PUBLIC]
    paths += list(experts)
    merged_router = merged_model.read_router(public)
    public = os.path.join(public, merged_model.PUBLIC_DIR)
  public_path, public_manifest, public_cfg = saved.open_public(public, verify_parameters=True)
  seen: dict[str, str] = {}
  out = []
  for path in paths:
    expert = read_expert(path, public_manifest, public_cfg, public_path)
    if expert.name == PUBLIC:
      raise ValueError(f"{expert.path}: the name 'public' is reserved for the public model.")
    experts_lib.validate([expert.name])
    if expert.name in seen:
      raise ValueError(f"Two experts are named {expert.name!r}: {seen[expert.name]} and "
                       f"{expert.path}; names identify experts, so each must be unique.")
    seen[expert.name] = expert.path
    out.append(expert)
  return Source(public_path, public_manifest, public_cfg, out, merged_router, merged_top_k)


def _own_rows(e: Expert) -> dict[str, np.ndarray]:
  rows = {f"{e.name}/router": e.router}
  if e.negative_bias is not None:
    rows[f"{e.name}/negative_bias"] = e.negative_bias
  return rows


def router_rows(source: Source, names: Sequence[str], negative_bias: bool) -> dict[str, np.ndarray]:
  """``<name>/router`` for every name, ``<name>/negative_bias`` for the non-public ones."""
  if source.router is not None:
    # A merged input keeps its (possibly tuned or imported) rows; an expert added to it must have
    # trained against that model's public row.
    rows = {k: v for k, v in source.router.items() if k.split("/")[0] in names}
    expected = router_fingerprint(source.router[f"{PUBLIC}/router"])
    for e in source.experts:
      if f"{e.name}/router" in rows:
        continue
      if e.manifest.get("public_router_fingerprint") != expected:
        raise ValueError(
            f"expert {e.name!r} ({e.path}) was trained against a different public router row "
            f"than the merged model {os.path.dirname(source.public_path)} routes with; train it "
            "against that merged model (`train-expert --public MERGED_DIR`), which trains "
            "against its live public row.")
      rows.update(_own_rows(e))
  else:
    by_mode: dict[str, list[str]] = {}
    for e in source.experts:
      by_mode.setdefault(_router_mode(e), []).append(e.name)
    if len(by_mode) > 1:
      raise ValueError(f"The experts were trained against different public router rows "
                       f"(router_init modes {by_mode}); they cannot share one router.")
    mode = next(iter(by_mode), "shared")
    cfg = source.public_cfg
    r_pub = (router_init.public_rows(mode, source.public_path, source.public_manifest["fingerprint"],
                                     cfg.n_layers, cfg.d_model)
             if source.experts else np.zeros((cfg.n_layers, cfg.d_model), np.float32))
    expected = router_fingerprint(r_pub)
    for e in source.experts:
      if e.manifest.get("public_router_fingerprint") != expected:
        raise ValueError(f"expert {e.name!r} ({e.path}) was trained against a different public "
                         f"router row than {source.public_path} gives for router_init={mode!r}.")
    rows = {f"{PUBLIC}/router": np.asarray(r_pub, np.float32)}
    for e in source.experts:
      rows.update(_own_rows(e))
  if not negative_bias:
    rows = {k: v for k, v in rows.items() if not k.endswith("/negative_bias")}
  return rows


def write_parts(partial: str, source: Source, rows: Mapping[str, np.ndarray], progress) -> dict:
  """Copies the public model and every expert into ``partial`` (each byte checked against its
  manifest's SHA-256) and writes the router; returns the files recorded, by relative path."""
  jobs, known = [], {}
  inputs = [(merged_model.PUBLIC_DIR, source.public_path, source.public_manifest)]
  inputs += [(os.path.join(merged_model.EXPERTS_DIR, e.name), e.path, e.manifest)
             for e in source.experts]
  for rel_dir, path, manifest in inputs:
    for rel, info in store.recorded_files(path, manifest).items():
      jobs.append((os.path.join(path, rel), os.path.join(partial, rel_dir, rel), info))
      known[os.path.join(rel_dir, rel)] = info
  if distributed.is_leader():   # with several processes (router tuning), process 0 writes
    for rel_dir, path, _ in inputs:
      os.makedirs(os.path.join(partial, rel_dir), exist_ok=True)
      shutil.copyfile(os.path.join(path, store.MANIFEST),
                      os.path.join(partial, rel_dir, store.MANIFEST))
    total = sum(j[2]["bytes"] for j in jobs)
    progress(f"merge: {1 + len(source.experts)} experts "
             f"{[PUBLIC, *(e.name for e in source.experts)]}, copying and checking "
             f"{total / 1e6:,.1f} MB")
    integrity.copy_checked(jobs)
    np.savez(os.path.join(partial, merged_model.ROUTER_FILE), **rows)
  return known


def default_top_k(source: Source, n: int) -> int:
  """Top-k when none is given: a merged input's own (all of the experts when it routed to all
  of its own, so adding an owner to it changes no other owner's routing), else
  min(DEFAULT_TOP_K, n)."""
  if source.router is not None:
    return n if source.top_k is None else min(source.top_k, n)
  return min(DEFAULT_TOP_K, n)


def complete_rows(rows: dict, names: Sequence[str], with_bias: bool, n_layers: int,
                  expert_bias: float, entering: Sequence[str]) -> dict:
  """Every expert's row checked present, a zero negative bias where one is missing, and
  ``expert_bias`` added to the experts ``entering`` from their artifacts; those of a merged
  input already carry theirs (a late joiner added to a tuned model leaves every row as it is)."""
  for name in names:
    if f"{name}/router" not in rows:
      raise ValueError(f"The router has no row for expert {name!r}.")
    if with_bias and name != PUBLIC and f"{name}/negative_bias" not in rows:
      rows[f"{name}/negative_bias"] = np.zeros((n_layers,), np.float32)
    if expert_bias and name != PUBLIC and name in entering:
      rows[f"{name}/negative_bias"] = (rows[f"{name}/negative_bias"]
                                       + np.float32(expert_bias)).astype(np.float32)
  return rows


def check_expert_bias(expert_bias: float, negative_bias: bool) -> None:
  if not (isinstance(expert_bias, (int, float)) and expert_bias <= 0 and np.isfinite(expert_bias)):
    raise ValueError(f"--expert-bias {expert_bias!r}: a negative bias is a number <= 0 (a "
                     "positive one is clipped to 0 by the router).")
  if expert_bias and not negative_bias:
    raise ValueError("--expert-bias is applied through the negative bias, which "
                     "--drop-negative-bias drops; choose one.")


def merge(public: str, experts: Sequence[str] = (), out: str | None = None, *,
          exclude: Sequence[str] = (), top_k: int | None = None, top_k_policy: str = "clamp",
          negative_bias: bool = True, router: Mapping[str, np.ndarray] | None = None,
          router_record: Mapping[str, Any] | None = None, overwrite: bool = False,
          expert_bias: float = 0.0, progress=print) -> str:
  """Writes the merged checkpoint; returns its directory. ``router`` replaces the router rows
  (router tuning); ``exclude`` drops names from the inputs for good. ``expert_bias`` (<= 0) is
  added to the negative bias of every expert entering from its artifact (not to those a merged
  input already holds): each owner trained beside the public expert alone, and among many
  experts the public one would otherwise get far less of the weight it had then
  (docs/method.md §6)."""
  if out is None:
    raise ValueError("merge needs an output directory (--out).")
  check_expert_bias(expert_bias, negative_bias)
  source = read_sources(public, experts)
  present = [e.name for e in source.experts]
  if PUBLIC in exclude:
    raise ValueError("--exclude public: the public model is the anchor of every expert; it "
                     "cannot be excluded (opt it out at inference with --experts instead).")
  missing = [n for n in exclude if n not in present]
  if missing:
    raise ValueError(f"--exclude {missing}: no such expert among the inputs {present}.")
  source.experts = sorted((e for e in source.experts if e.name not in exclude),
                          key=lambda e: e.name)
  names = (PUBLIC, *(e.name for e in source.experts))
  k = top_k if top_k is not None else default_top_k(source, len(names))
  with_bias = negative_bias and (bool(expert_bias) or any(e.negative_bias is not None
                                                           for e in source.experts))
  cfg = source.public_cfg.replace(experts=names, top_k=k, top_k_policy=top_k_policy,
                                  negative_bias=with_bias)
  rows = complete_rows(dict(router) if router is not None
                       else router_rows(source, names, with_bias), names, with_bias,
                       cfg.n_layers, expert_bias,
                       entering=names if router is not None or source.router is None
                       else [n for n in names if f"{n}/router" not in source.router])

  out, partial = store.begin(out, overwrite)
  try:
    manifest = {
        "kind": merged_model.KIND, "config": store.config_to_json(cfg), "experts": list(names),
        "vocabulary": source.public_manifest["vocabulary"],
        "anchor_fingerprint": source.public_manifest["fingerprint"],
        "data_cards": {PUBLIC: source.public_manifest.get("data_card", {}),
                       **{e.name: e.manifest.get("data_card", {}) for e in source.experts}},
        "router": {**dict(router_record or {"source": "experts"}),
                   **({"expert_bias": float(expert_bias)} if expert_bias else {})},
    }
    store.finish(partial, out, manifest, write_parts(partial, source, rows, progress))
  except BaseException:
    shutil.rmtree(partial, ignore_errors=True)
    raise
  for name in names:
    progress("  " + accounting.describe(name, manifest["data_cards"].get(name, {})))
  progress(f"merged model -> {out}")
  return out


def save_moe(out: str, cfg: ModelConfig, params: Mapping[str, Any], *, vocabulary: dict,
             extra_files: Mapping[str, str] | None = None, public_card: dict | None = None,
             expert_cards: Mapping[str, dict] | None = None,
             router_record: Mapping[str, Any] | None = None, parts: str | None = None,
             overwrite: bool = False, progress=print) -> str:
  """Writes a whole MoE (stacked ``[L, E, ...]`` parameters, expert 0 ``public``) as a merged
  checkpoint: the public model (the trunk with expert 0's FFN) and one artifact per other expert,
  then :func:`merge`. ``parts`` keeps the public model and the artifacts there
  (``parts/public``, ``parts/experts/<name>``); by default they are temporary."""
  if cfg.experts[0] != PUBLIC:
    raise ValueError(f"Expert 0 must be {PUBLIC!r}, got {cfg.experts[0]!r}.")
  experts_lib.validate(cfg.experts)
  out = os.path.abspath(out)
  if os.path.exists(out) and not overwrite:
    raise FileExistsError(f"{out} already exists; choose another output or overwrite.")
  work = parts or f"{out}.parts-{os.getpid()}"
  ffn = params["blocks"]["ffn"]
  take = lambda key, e: np.asarray(ffn[key][:, e], np.float32)
  trunk = {**params, "blocks": {**params["blocks"], "ffn": {
      merged_model.DENSE_FFN[key]: take(key, 0) for key in merged_model.FFN_KEYS}}}
  fingerprint = store.fingerprint(trunk)
  dense_cfg = cfg.replace(experts=(), top_k=1, negative_bias=False)
  try:
    public_path = store.save(os.path.join(work, merged_model.PUBLIC_DIR), trunk, {
        "kind": "public", "config": store.config_to_json(dense_cfg), "vocabulary": vocabulary,
        "fingerprint": fingerprint, "data_card": dict(public_card or {})},
        extra_files=extra_files, overwrite=overwrite)
    rows = {f"{PUBLIC}/router": take("router_embedding", 0)}
    artifacts = []
    for e, name in enumerate(cfg.experts[1:], start=1):
      expert_params = {key: take(key, e) for key in merged_model.FFN_KEYS}
      expert_params["router"] = rows[f"{name}/router"] = take("router_embedding", e)
      if cfg.negative_bias:
        expert_params["negative_bias"] = rows[f"{name}/negative_bias"] = take("negative_bias", e)
      expert_cfg = cfg.replace(experts=(PUBLIC, name), top_k=min(cfg.top_k, 2))
      artifacts.append(store.save(os.path.join(work, merged_model.EXPERTS_DIR, name),
                                  expert_params, {
          "kind": "expert", "name": name, "anchor_fingerprint": fingerprint,
          "config": store.config_to_json(expert_cfg), "vocabulary": vocabulary,
          "public_router_fingerprint": router_fingerprint(rows[f"{PUBLIC}/router"]),
          "data_card": dict((expert_cards or {}).get(name, {}))}, overwrite=overwrite))
    return merge(public_path, artifacts, out, top_k=cfg.top_k, top_k_policy=cfg.top_k_policy,
                 negative_bias=cfg.negative_bias, router=rows, router_record=router_record,
                 overwrite=overwrite, progress=progress)
  finally:
    if parts is None:
      shutil.rmtree(work, ignore_errors=True)
