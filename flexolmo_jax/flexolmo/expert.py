"""``flexolmo train-expert``: one data owner's expert against the frozen public model (spec 4, 5).

The 2-expert model is ``public`` + ``NAME``. Its parameters are kept as two trees:

- ``frozen``: the public checkpoint as loaded (embeddings, attention, norms, lm_head, the public
  FFN) and the public router row ``r_pub``. It is an input of the step, never differentiated,
  has no optimizer state and is never written back.
- ``params`` (trainable): the new expert's FFN in every layer (initialized as a copy of the
  public FFN), its router row in every layer and its negative bias.

The step assembles the stacked ``[L, 2, ...]`` MoE weights from both trees; gradients flow to the
trainable half only. The output is an *expert artifact*: only the trainable tree plus a manifest
(name, anchor fingerprint, config, vocabulary, data card). Nothing but the public checkpoint and
the owner's paths is read.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from flexolmo_jax import experts as experts_lib
from flexolmo_jax import paths, sharding
from flexolmo_jax.checkpoint import merged_model, saved, store
from flexolmo_jax.config import ModelConfig, write_gin_config
from flexolmo_jax.data import tasks, vocabularies
from flexolmo_jax.experts import PUBLIC
from flexolmo_jax.flexolmo import router_init
from flexolmo_jax.model.transformer import PureModel, pure_model, run_on_batch
from flexolmo_jax.privacy import accounting, documents, dpsgd
from flexolmo_jax.privacy import router as private_router
from flexolmo_jax.train import loop, metrics, streams

# Logical axes of the trainable tree (for its shardings).
EXPERT_AXES = {"w_gate": ("layers", "embed", "mlp"), "w_up": ("layers", "embed", "mlp"),
               "w_down": ("layers", "mlp", "embed"), "router": ("layers", "embed"),
               "negative_bias": ("layers",)}


@gin.configurable(module="flexolmo")
@dataclasses.dataclass(frozen=True)
class ExpertConfig:
  """How the 2-expert model routes while the expert trains (docs/method.md §4-5)."""

  top_k: int = 2                       # 2 of 2: the reference script's soft mixture
  negative_bias: bool = True
  negative_bias_init: float = 0.0
  router_init: str = "shared"          # shared | per_layer | random | classifier (router_init.MODES)
  router_init_documents: int = 1000
  # ``classifier`` init: the prior odds of a token being public rather than this owner's; its
  # log goes into the initial negative bias. 1 (even odds) trains the expert at about half the
  # weight on its own tokens, as the paper's soft mixture does; measured at quick size, odds of
  # 4 and 16 left the expert less to learn from and its merge worse (docs/method.md §5).
  router_public_odds: float = 1.0
  # The owner's row is r_pub + router_init_scale * (e_own - r_pub): 1 is the paper's row, the
  # domain embedding itself; above 1 stretches what sets the owner's domain apart from the
  # public one (the domain embeddings share one dominant direction, docs/method.md §5).
  router_init_scale: float = 1.0
  # Drop the part of (e_own - r_pub) along r_pub before scaling: what is left is what sets the
  # owner's domain apart, not how concentrated its embeddings are (which r_pub's direction
  # carries, and which would raise or lower the owner's logit on every token alike).
  router_init_orthogonal: bool = False
  dispatch: str | None = None          # None: the public config's backend
  # How the frozen public model is held while the expert trains: None as stored (fp32), or
  # "bfloat16", which halves its memory (it has no optimizer state and needs no fp32 copy; the
  # expert's own weights stay fp32 master weights).
  anchor_dtype: str | None = None

  def __post_init__(self):
    if self.anchor_dtype not in (None, "float32", "bfloat16"):
      raise ValueError(f"ExpertConfig: anchor_dtype={self.anchor_dtype!r}; choose float32 or "
                       "bfloat16.")
    if self.router_init not in router_init.MODES:
      raise ValueError(f"ExpertConfig: router_init={self.router_init!r}; choose one of "
                       f"{router_init.MODES}.")
    if not (isinstance(self.router_public_odds, (int, float)) and self.router_public_odds > 0):
      raise ValueError(f"ExpertConfig: router_public_odds={self.router_public_odds!r} must be a "
                       "number above 0.")
    if not (isinstance(self.router_init_scale, (int, float)) and self.router_init_scale > 0):
      raise ValueError(f"ExpertConfig: router_init_scale={self.router_init_scale!r} must be a "
                       "number above 0.")
    if self.top_k not in (1, 2):
      raise ValueError(f"ExpertConfig: top_k={self.top_k}; the 2-expert model takes 1 or 2.")


def expert_config(public_cfg: ModelConfig, name: str, ecfg: ExpertConfig) -> ModelConfig:
  return public_cfg.replace(experts=(PUBLIC, name), top_k=ecfg.top_k,
                            negative_bias=ecfg.negative_bias,
                            dispatch=ecfg.dispatch or public_cfg.dispatch)


def assemble(anchor: dict, public_router, expert: dict) -> dict:
  """The 2-expert model's parameters: public first, then the expert, stacked on axis 1."""
  blocks = anchor["blocks"]
  ffn = blocks["ffn"]
  # In the expert's dtype: a bf16 anchor is widened exactly, the fp32 expert is not rounded.
  stack = lambda a, b: jnp.stack([a.astype(b.dtype), b], axis=1)
  moe = {"router_embedding": stack(public_router, expert["router"]),
         "w_gate": stack(ffn["gate_proj"], expert["w_gate"]),
         "w_up": stack(ffn["up_proj"], expert["w_up"]),
         "w_down": stack(ffn["down_proj"], expert["w_down"])}
  if "negative_bias" in expert:
    moe["negative_bias"] = stack(jnp.zeros_like(expert["negative_bias"]), expert["negative_bias"])
  return {**anchor, "blocks": {**blocks, "ffn": moe}}


def initial_expert(anchor: dict, router_row, ecfg: ExpertConfig, bias=None) -> dict:
  ffn = anchor["blocks"]["ffn"]
  expert = {"w_gate": jnp.array(ffn["gate_proj"]), "w_up": jnp.array(ffn["up_proj"]),
            "w_down": jnp.array(ffn["down_proj"]), "router": jnp.array(router_row, jnp.float32)}
  if ecfg.negative_bias:
    expert["negative_bias"] = (jnp.full(router_row.shape[:1], ecfg.negative_bias_init, jnp.float32)
                               if bias is None else jnp.asarray(bias, jnp.float32))
  return expert


def hold_anchor(anchor: dict, ecfg: ExpertConfig) -> dict:
  """The frozen public model in ``ecfg.anchor_dtype`` (floating leaves; as stored if None)."""
  if ecfg.anchor_dtype is None:
    return anchor
  dtype = jnp.dtype(ecfg.anchor_dtype)
  return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                      anchor)


def expert_shardings(expert: dict, mesh, rules) -> dict:
  out = {}
  for key, value in expert.items():
    spec = rules.spec(EXPERT_AXES[key])
    sharding.check_divisible(f"expert parameter {key}", value.shape, spec, mesh)
    out[key] = NamedSharding(mesh, spec)
  return out


def training_parts(moe: PureModel, params: dict, anchor_shardings: dict, mesh, rules):
  """(apply, expert shardings, frozen shardings) of expert training: the trainable ``params``
  (concrete or abstract) beside the frozen ``{"anchor", "public_router"}``."""
  apply = lambda p, fz, batch: run_on_batch(moe, assemble(fz["anchor"], fz["public_router"], p),
                                            batch)
  frozen_shardings = {"anchor": anchor_shardings,
                      "public_router": NamedSharding(mesh, rules.spec(EXPERT_AXES["router"]))}
  return apply, expert_shardings(params, mesh, rules), frozen_shardings


def router_rows(mode: str, public_path: str, manifest: dict, cfg: ModelConfig,
                owner_embedding: dict, seed: int, scale: float = 1.0,
                live_public_row: np.ndarray | None = None, orthogonal: bool = False,
                public_odds: float = 1.0):
  """(r_pub, r_NAME [L, d], initial negative bias [L] or None) from the owner's domain embedding
  (or random); ``scale`` stretches the owner's row away from r_pub
  (ExpertConfig.router_init_scale). Joining a merged model, r_pub is that model's
  ``live_public_row`` (see :func:`joined_model`). ``classifier``: r_NAME = r_pub + w and the
  bias b of router_init.classifier_rows.

  The domain embedding is computed in every mode: it goes into the artifact, where router tuning
  uses it to pick proxy documents from the public data (flexolmo/router_tune.py)."""
  r_pub = router_init.public_rows(mode, public_path, manifest["fingerprint"], cfg.n_layers,
                                  cfg.d_model) if live_public_row is None else live_public_row
  if mode == "random":
    return r_pub, router_init.random_rows(jax.random.key(seed), cfg.n_layers, cfg.d_model), None
  if mode == "classifier":
    w, b = router_init.classifier_rows(owner_embedding, router_init.public_embedding(public_path),
                                       public_odds)
    return r_pub, (r_pub + w).astype(np.float32), b
  own = router_init.rows_for(mode, owner_embedding, cfg.n_layers, cfg.d_model)
  if scale == 1.0 and not orthogonal:
    return r_pub, own, None
  delta = own - r_pub
  if orthogonal:
    unit = r_pub / np.maximum(np.linalg.norm(r_pub, axis=-1, keepdims=True), 1e-30)
    delta = delta - np.sum(delta * unit, axis=-1, keepdims=True) * unit
  return r_pub, (r_pub + scale * delta).astype(np.float32), None


def task_embedding(model: PureModel, anchor, task: str, train: loop.TrainConfig,
                   num_documents: int = 1000, moments: bool = False) -> dict:
  """The domain embedding of ``task``'s first ``num_documents`` documents (one pass, the same
  rows on every host), with its token statistics when ``moments``."""
  return router_init.domain_embedding(
      model, anchor, tasks.lm_batches(task, seq_len=train.seq_len, batch_size=8, seed=train.seed,
                                      num_epochs=1, shard_index=0, num_shards=1), num_documents,
      moments)


def private_setup(dp, task: str, train: loop.TrainConfig, model: PureModel, anchor, n_layers: int,
                  vocab, data_dir: str):
  """DP mode: the owner's documents, the run's guarantee (noise calibrated before any step) and a
  domain embedding that spends its share of epsilon or reads public proxy text instead."""
  docs = documents.load(task, train.seq_len, dp.chunks_per_document)
  guarantee = accounting.plan(dp, train.batch_size, docs.count, train.steps)
  if dp.router_init == "proxy":
    proxy = tasks.register_corpus("dp_router_proxy", list(dp.router_proxy), data_dir=data_dir,
                                  vocabulary=vocab)
    embedding = task_embedding(model, anchor, proxy, train)
  else:
    embedding = private_router.noised_mean(model, anchor, docs, n_layers,
                                           dp.router_noise_multiplier, train.seed)
  print(f"DP: {docs.count} documents, noise multiplier {guarantee.noise_multiplier:.4f}, "
        f"epsilon {guarantee.epsilon:.4f} at delta {guarantee.delta:g} ({dp.accountant}, "
        f"{dp.sampling} sampling q={guarantee.sampling_rate:.4g}, {train.steps} steps)")
  return docs, guarantee, embedding


def joined_model(public: str) -> tuple[str, np.ndarray | None]:
  """(public model directory, the live public router row [L, d] or None).

  An owner who joins a consortium after its merge (and router tuning) trains against the merged
  model itself: its public model is the anchor, and its router row is the one the merged model
  routes with now (tuned or imported), so that `merge MERGED --expert NEW` accepts the new
  expert without touching any existing row."""
  path = store.saved_dir(public)
  if store.read_manifest(path).get("kind") != merged_model.KIND:
    return public, None
  router = merged_model.read_router(path)
  return (os.path.join(path, merged_model.PUBLIC_DIR),
          np.asarray(router[f"{PUBLIC}/router"], np.float32))


def check_public(public: str, name: str, vocabulary: str | None, train: loop.TrainConfig
                 ) -> tuple[str, dict, ModelConfig]:
  """The public model an owner trains against, checked against the owner's settings: a free
  name, a sequence length it supports and (when given) the same vocabulary."""
  if name == PUBLIC:
    raise ValueError(f"The expert name {PUBLIC!r} is reserved for the public model; choose "
                     "another name for this data owner's expert.")
  experts_lib.validate([PUBLIC, name])
  public_path, manifest, public_cfg = saved.open_public(public)
  loop.check_seq_len(train, public_cfg.max_seq_len)
  if vocabulary is not None:
    given = vocabularies.identity(vocabulary)
    expected = {k: v for k, v in manifest["vocabulary"].items() if k != "spec"}
    if given != expected:
      raise ValueError(f"The vocabulary {vocabulary!r} is {vocabularies.describe(given)}, but the "
                       f"public model {public_path} was trained with "
                       f"{vocabularies.describe(manifest['vocabulary'])}.")
  return public_path, manifest, public_cfg


def load_anchor(dense: PureModel, public_path: str, manifest: dict, mesh, rules):
  """(parameters, shardings) of the public model on the mesh, checked against its fingerprint."""
  shardings = dense.shardings(mesh, rules)
  anchor = store.load_params(public_path, jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      dense.abstract.to_pure_dict(), shardings))
  if store.fingerprint(anchor) != manifest["fingerprint"]:
    raise ValueError(f"{public_path}: the parameters do not match the manifest's fingerprint "
                     "(the checkpoint is corrupt or was modified).")
  return anchor, shardings


def save_artifact(output_dir: str, name: str, result, manifest: dict, cfg: ModelConfig,
                  frozen: dict, data, train, ecfg: ExpertConfig, embedding: dict,
                  dp_card: dict | None) -> str:
  """The expert artifact: only the trainable tree, its manifest and the domain embedding."""
  out = os.path.join(output_dir, "expert")
  artifact = {
      "kind": "expert", "name": name, "anchor_fingerprint": manifest["fingerprint"],
      "config": store.config_to_json(cfg), "vocabulary": manifest["vocabulary"],
      "public_router_fingerprint": store.fingerprint({"public_router": frozen["public_router"]}),
      "data_card": streams.data_card(name, data, result, train,
                                     expert_config=dataclasses.asdict(ecfg)),
  }
  if dp_card is not None:
    artifact["data_card"]["dp"] = dp_card
  emb_path = os.path.join(output_dir, router_init.DOMAIN_EMBEDDING_FILE)
  if jax.process_index() == 0:   # store.save copies it in from process 0
    # The owner's token statistics stay with the owner: the artifact carries only the means.
    np.savez(emb_path, **{k: v for k, v in embedding.items() if not k.startswith("token")})
  store.save(out, result.params, artifact, overwrite=True,
             extra_files={router_init.DOMAIN_EMBEDDING_FILE: emb_path})
  print(f"expert {name!r} -> {out}")
  return out


@gin.configurable(module="flexolmo")
def train_expert(public: str = gin.REQUIRED, name: str = gin.REQUIRED,
                 data: Sequence[str] = gin.REQUIRED, output_dir: str = gin.REQUIRED,
                 vocabulary: str | None = None, dtype: str | None = None,
                 train: loop.TrainConfig | None = None, expert: ExpertConfig | None = None,
                 rules: sharding.ShardingRules | None = None,
                 dp: accounting.DPConfig | None = None):
  """Trains expert ``name`` on ``data``; returns (TrainResult, artifact directory or None).

  With ``dp.enabled`` the expert is trained with DP-SGD (flexolmo_jax/privacy)."""
  train, ecfg = train or loop.TrainConfig(), expert or ExpertConfig()
  dp, rules = dp or accounting.DPConfig(), rules or sharding.ShardingRules()
  data, output_dir = paths.absolute_all([data] if isinstance(data, str) else data), \
      paths.absolute(output_dir)
  store.refuse_to_replace(os.path.join(output_dir, "expert"), train.steps)
  public, live_public_row = joined_model(public)
  public_path, manifest, public_cfg = check_public(public, name, vocabulary, train)
  if dtype:
    public_cfg = public_cfg.replace(dtype=dtype)
  cfg = expert_config(public_cfg, name, ecfg)
  vocab = vocabularies.load(saved.vocabulary_spec(public_path, manifest))
  dense, moe = pure_model(public_cfg), pure_model(cfg)
  mesh = sharding.make_mesh(train.mesh)
  anchor, anchor_shardings = load_anchor(dense, public_path, manifest, mesh, rules)
  write_gin_config(output_dir)
  data_dir = os.path.join(output_dir, "data")
  task = tasks.register_corpus(name, data, data_dir=data_dir, vocabulary=vocab)
  if dp.enabled and ecfg.router_init == "classifier":
    raise ValueError("router_init='classifier' reads second moments of the owner's data, which "
                     "DP-SGD does not cover; with --dp use 'shared' or 'per_layer' (a noised mean).")
  if dp.enabled:
    docs, guarantee, owner_embedding = private_setup(dp, task, train, dense, anchor,
                                                     public_cfg.n_layers, vocab, data_dir)
  else:
    owner_embedding = task_embedding(dense, anchor, task, train, ecfg.router_init_documents,
                                     moments=ecfg.router_init == "classifier")
  r_pub, r_own, bias = router_rows(ecfg.router_init, public_path, manifest, public_cfg,
                                   owner_embedding, train.seed, ecfg.router_init_scale,
                                   live_public_row, ecfg.router_init_orthogonal,
                                   ecfg.router_public_odds)
  params = initial_expert(anchor, r_own, ecfg, bias)   # from the fp32 public weights
  frozen = {"anchor": hold_anchor(anchor, ecfg), "public_router": jnp.asarray(r_pub, jnp.float32)}
  apply, param_shardings, frozen_shardings = training_parts(moe, params, anchor_shardings, mesh,
                                                            rules)
  trainer = loop.Trainer(
      train, workdir=output_dir, mesh=mesh, rules=rules, apply=apply, params=params,
      frozen=frozen, param_shardings=param_shardings, frozen_shardings=frozen_shardings,
      stream=(documents.stream(docs, dp.sampling, train.batch_size, train.steps, train.seed,
                               pad_to=dp.microbatch_size) if dp.enabled
              else streams.train_stream(task, train)),
      gradient=dpsgd.dp_gradient(apply, train, dp, guarantee) if dp.enabled else None,
      eval_streams=({name: streams.eval_stream(task, train)}
                    if tasks.has_split(task, "validation") else {}),
      flops_per_token=metrics.flops_per_token(cfg, train.seq_len), expert_names=cfg.experts)
  result = trainer.train()
  if result.preempted:
    return result, None
  dp_card = ({**guarantee.to_json(), **docs.card(), "microbatch_size": dp.microbatch_size}
             if dp.enabled else None)
  return result, save_artifact(output_dir, name, result, manifest, cfg, frozen, data, train,
                               ecfg, owner_embedding, dp_card)
