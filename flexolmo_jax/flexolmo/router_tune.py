"""``flexolmo tune-router``: optional router tuning on public proxy data (docs/method.md §6).

Closed data is never read. The only view of a domain is what its artifact carries: the domain
embedding its owner computed (``domain_embedding.npz``, the mean of L2-normalized document
embeddings) next to the public one (``public_embedding.npz``).

1. **Proxy sets.** Every public segment is embedded by the public model the same way. A linear
   classifier per domain, "domain i vs public", scores it as ``x . (e_i - e_pub)`` (the
   nearest-centroid rule on the two embeddings); the top ``proxy_fraction`` of the public
   segments with a positive score form domain i's proxy set.
2. **Tuning.** Only the router rows of every expert (``public`` included) are trained, with all
   experts active (top-k = E), on the public data in which proxy segments weigh
   ``1 + proxy_weight`` in the loss. Everything else, negative biases included, is frozen.
3. **Interpolation** (``interpolation`` < 1; not in the paper, 1 by default): the saved rows
   are ``init + interpolation * (tuned - init)``, part of the way from the merge's rows to the
   tuned ones, as WiSE-FT interpolates a fine-tuned model with its start. The tuning data is
   public, not the closed domains the rows must route: the way back keeps more of what the
   owners' own initialization knew. Measured in the demo (docs/results.md).
4. The result is a new merged checkpoint (``<out>/merged``) with the tuned ``router.npz`` and
   ``top_k`` = E, the setting it was tuned for; the experts' files are copied unchanged.

**Expert dropout** (``expert_dropout`` > 0; not in the paper, off by default): each training
sequence opts every non-public expert out with that probability (the same softmax as a real
opt-out, see ``moe.route``), so the router learns mixtures in which any owner may be missing.
Measured in the demo: without it, opting an expert out sent its domain's tokens
to the other owners' experts, which are worse there than the public FFN.

Reference settings (7B): lr 2e-3, 100 warm-up steps, weight decay 0.1.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
from typing import Sequence

import gin
import jax
import numpy as np

from flexolmo_jax import paths, sharding
from flexolmo_jax.checkpoint import merged_model, saved, store
from flexolmo_jax.config import write_gin_config
from flexolmo_jax.data import sources, tasks, vocabularies
from flexolmo_jax.experts import PUBLIC
from flexolmo_jax.flexolmo import merge as merge_lib
from flexolmo_jax.flexolmo import router_init
from flexolmo_jax.model import moe as moe_lib
from flexolmo_jax.model.embedding import segment_embeddings
from flexolmo_jax.model.transformer import pure_model, run_on_batch
from flexolmo_jax.train import loop, metrics, streams
from flexolmo_jax.train import params as params_lib


@gin.configurable(module="flexolmo")
@dataclasses.dataclass(frozen=True)
class RouterTuneConfig:
  proxy_fraction: float = 0.1     # share of the public segments kept per domain (at most)
  proxy_weight: float = 4.0       # extra loss weight of a proxy segment
  max_batches: int = 1000         # public batches scored and kept in memory for tuning
  expert_dropout: float = 0.0     # per sequence, the chance each non-public expert is left out
  interpolation: float = 1.0      # share of the way from the merge's rows to the tuned ones kept

  def __post_init__(self):
    if not 0 <= self.expert_dropout < 1:
      raise ValueError(f"RouterTuneConfig: expert_dropout={self.expert_dropout} not in [0, 1).")
    if not 0 < self.interpolation <= 1:
      raise ValueError(f"RouterTuneConfig: interpolation={self.interpolation} not in (0, 1].")
    if not 0 < self.proxy_fraction <= 1:
      raise ValueError(f"RouterTuneConfig: proxy_fraction={self.proxy_fraction} not in (0, 1].")
    if self.proxy_weight < 0:
      raise ValueError(f"RouterTuneConfig: proxy_weight={self.proxy_weight} must be >= 0.")


def domain_embeddings(merged_path: str, names: Sequence[str]) -> dict[str, np.ndarray]:
  """{name: [d]} the ``shared`` domain embedding of every expert (public included)."""
  out = {}
  for name in names:
    if name == PUBLIC:
      path = os.path.join(merged_path, merged_model.PUBLIC_DIR, router_init.EMBEDDING_FILE)
    else:
      path = os.path.join(merged_path, merged_model.EXPERTS_DIR, name,
                          router_init.DOMAIN_EMBEDDING_FILE)
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} is missing: expert {name!r} carries no domain embedding, "
                              "so no proxy set can be chosen for it; tune on the public data "
                              "alone with --proxy-weight 0 (as for a BTX-lite merge).")
    with np.load(path) as f:
      out[name] = np.asarray(f["shared"], np.float32)
  return out


def proxy_weights(dense_cfg, dense_params, batches, embeddings, cfg: RouterTuneConfig):
  """(loss-weight arrays per batch, {domain: proxy segment count}) over the public batches."""
  model = pure_model(dense_cfg)

  @jax.jit
  def embed(params, batch):
    _, _, hidden = run_on_batch(model, params, batch, return_hidden=True)
    return segment_embeddings(hidden.final, batch["decoder_segment_ids"])

  domains = [n for n in embeddings if n != PUBLIC]
  directions = np.stack([embeddings[n] - embeddings[PUBLIC] for n in domains], axis=1)  # [d, D]
  scores, keys = [], []
  for i, batch in enumerate(batches):
    emb, valid = jax.device_get(embed(dense_params, batch))
    for j in np.flatnonzero(valid):
      scores.append(emb[j] @ directions)
      keys.append((i, j))
  scores = np.asarray(scores).reshape(len(keys), len(domains))
  chosen = np.zeros(len(keys), bool)
  counts = {}
  per_domain = max(1, int(cfg.proxy_fraction * len(keys)))
  for d, name in enumerate(domains):
    order = np.argsort(-scores[:, d])[:per_domain]
    order = order[scores[order, d] > 0]
    chosen[order] = True
    counts[name] = int(len(order))
  boost = {key for key, c in zip(keys, chosen) if c}
  weights = []
  for i, batch in enumerate(batches):
    b, t = batch["decoder_segment_ids"].shape
    seg_index = np.arange(b)[:, None] * t + batch["decoder_segment_ids"]
    extra = np.isin(seg_index, [j for (bi, j) in boost if bi == i])
    weights.append(batch["decoder_loss_weights"] * (1.0 + cfg.proxy_weight * extra))
  return weights, counts


def expert_keep(names: Sequence[str], shape: tuple[int, int], dropout: float, seed) -> np.ndarray:
  """[B, T, E] bool: per sequence, each non-public expert kept with probability 1 - dropout
  (deterministic in ``seed``, so a resumed run sees the same masks)."""
  rng = np.random.default_rng(seed)
  keep = rng.random((shape[0], len(names))) >= dropout
  keep[:, [n == PUBLIC for n in names]] = True
  return np.broadcast_to(keep[:, None, :], (*shape, len(names)))


def is_router(path) -> bool:
  """The trainable leaves of router tuning: every layer's router rows."""
  return path[-1] == "router_embedding"


def training_parts(moe, mesh, rules):
  """(apply, router shardings, frozen shardings) of router tuning: the router rows train, the
  rest of the merged model is frozen."""
  router_shardings, frozen_shardings = params_lib.split(moe.shardings(mesh, rules), is_router)
  apply = lambda p, fz, batch: run_on_batch(moe, params_lib.join(p, fz), batch,
                                            expert_keep_bte=batch.get("expert_keep"))
  return apply, router_shardings, frozen_shardings


def tuning_batches(task: str, merged: str, cfg, embeddings, train: loop.TrainConfig,
                   tune: RouterTuneConfig) -> tuple[list[dict], dict]:
  """(batches, proxy segments per domain): the public batches router tuning cycles through,
  their loss weights on the proxy segments (or, without embeddings, on every token).

  Every process reads the same global batches (the tuning set is small) and scores them the
  same way."""
  full = (b for b in tasks.lm_batches(task, seq_len=train.seq_len, batch_size=train.batch_size,
                                      seed=train.seed, num_epochs=1, shard_index=0, num_shards=1)
          if len(b["decoder_input_tokens"]) == train.batch_size)
  batches = list(itertools.islice(full, tune.max_batches))
  if not batches:
    raise ValueError(f"The public data of {task!r} gave no full batch of "
                     f"{train.batch_size} x {train.seq_len} tokens.")
  if embeddings is None:
    weights, counts = [b["decoder_loss_weights"] for b in batches], {}
    print(f"tuning on {len(batches)} batches of public data, no proxy sets (proxy_weight 0)")
  else:
    dense_cfg = cfg.replace(experts=(), top_k=1, negative_bias=False)
    dense_params = store.load_params(os.path.join(merged, merged_model.PUBLIC_DIR),
                                     pure_model(dense_cfg).abstract.to_pure_dict())
    weights, counts = proxy_weights(dense_cfg, dense_params, batches, embeddings, tune)
    del dense_params
    print(f"proxy segments per domain, chosen from {len(batches)} batches of public data: "
          f"{counts}")
  return ([{**b, "decoder_loss_weights": w.astype(np.float32)} for b, w in zip(batches, weights)],
          counts)


def tuning_stream(batches: list[dict], names, train: loop.TrainConfig, tune: RouterTuneConfig):
  """``start -> iterator`` over this process's rows of the cycled batches (with the expert
  dropout mask of each step)."""
  rows = streams.host_batch_size(train.batch_size)
  mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)

  def stream(start):
    for i in itertools.count(start):
      batch = batches[i % len(batches)]
      if tune.expert_dropout:
        batch = {**batch, "expert_keep": expert_keep(names, batch["decoder_input_tokens"].shape,
                                                     tune.expert_dropout, (train.seed, i))}
      yield {k: v[mine] for k, v in batch.items()}
  return stream


def save_tuned(merged: str, names, tuned_rows, counts: dict, data, result, train, tune,
               cfg, output_dir: str) -> str:
  """The merged model again with the tuned router rows (``<output_dir>/merged``), each moved
  ``tune.interpolation`` of the way from the merge's row."""
  tuned = store.host_value(tuned_rows)                 # [L, E, d]
  start = merged_model.read_router(merged)
  rows = {k: v for k, v in start.items() if k.endswith("/negative_bias")}
  for e, n in enumerate(names):
    # At 1 the tuned rows themselves: init + (tuned - init) can differ from them in the last bit.
    init = np.asarray(start[f"{n}/router"], np.float32)
    rows[f"{n}/router"] = (init + np.float32(tune.interpolation) * (tuned[:, e] - init)
                           if tune.interpolation != 1 else tuned[:, e])
  record = {"source": "tune-router", "proxy_segments": counts,
            "public_sources": [sources.source_label(p) for p in data],
            "steps": result.step, "tune_config": dataclasses.asdict(tune),
            "train_config": dataclasses.asdict(train)}
  return merge_lib.merge(merged, [], os.path.join(output_dir, "merged"), top_k=cfg.num_experts,
                         top_k_policy=cfg.top_k_policy, negative_bias=cfg.negative_bias,
                         router=rows, router_record=record, overwrite=True)


@gin.configurable(module="flexolmo")
def tune_router(merged: str = gin.REQUIRED, data: Sequence[str] = gin.REQUIRED,
                output_dir: str = gin.REQUIRED, train: loop.TrainConfig | None = None,
                tune: RouterTuneConfig | None = None,
                rules: sharding.ShardingRules | None = None):
  """Tunes the router of the merged model on public data; returns (TrainResult, out or None)."""
  train, tune = train or loop.TrainConfig(), tune or RouterTuneConfig()
  rules = rules or sharding.ShardingRules()
  data, output_dir = paths.absolute_all([data] if isinstance(data, str) else data), \
      paths.absolute(output_dir)
  merged = store.saved_dir(merged)
  manifest = store.read_manifest(merged, merged_model.KIND)
  cfg, params = merged_model.load_merged(merged)
  loop.check_seq_len(train, cfg.max_seq_len)
  cfg = cfg.replace(top_k=cfg.num_experts)        # all experts active
  names = cfg.experts
  # proxy_weight 0 tunes on the public data alone (the BTX-lite baseline): no proxy sets, so no
  # domain embedding is read.
  embeddings = domain_embeddings(merged, names) if tune.proxy_weight else None
  vocab = vocabularies.load(saved.vocabulary_spec(
      os.path.join(merged, merged_model.PUBLIC_DIR), manifest))
  write_gin_config(output_dir)
  task = tasks.register_corpus("public", data, data_dir=os.path.join(output_dir, "data"),
                               vocabulary=vocab)
  batches, counts = tuning_batches(task, merged, cfg, embeddings, train, tune)
  mesh = sharding.make_mesh(train.mesh)
  cfg = moe_lib.rows_for_mesh(cfg, mesh, rules)      # zero experts pad E to the expert axis
  moe = pure_model(cfg)
  trainable, frozen = params_lib.split(moe_lib.pad_rows(params, cfg.num_expert_rows), is_router)
  apply, router_shardings, frozen_shardings = training_parts(moe, mesh, rules)
  trainer = loop.Trainer(
      train, workdir=output_dir, mesh=mesh, rules=rules, apply=apply, params=trainable,
      frozen=frozen, param_shardings=router_shardings, frozen_shardings=frozen_shardings,
      stream=tuning_stream(batches, names, train, tune),
      flops_per_token=metrics.flops_per_token(cfg, train.seq_len), expert_names=names)
  result = trainer.train()
  if result.preempted:
    return result, None
  return result, save_tuned(merged, names, result.params["blocks"]["ffn"]["router_embedding"],
                            counts, data, result, train, tune, cfg, output_dir)
