"""``flexolmo pretrain``: the dense public model on the public data (the anchor of every expert).

Writes ``<output_dir>/model`` (kind ``public``): parameters, the manifest with the anchor
fingerprint, the vocabulary, and ``public_embedding.npz``, the public domain embedding that every
owner's ``train-expert`` uses for the public router row, so all experts share one ``r_pub``.

With ``init_from`` the same training continues a public model on one domain instead: the dense
baseline of that domain (kind ``dense``, ``flexolmo train-dense``, docs/method.md §7).
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import gin
import jax
import numpy as np

from flexolmo_jax import paths, sharding
from flexolmo_jax.checkpoint import saved, store
from flexolmo_jax.config import ModelConfig, write_gin_config
from flexolmo_jax.data import tasks, vocabularies
from flexolmo_jax.flexolmo import router_init
from flexolmo_jax.model.transformer import pure_model, run_on_batch
from flexolmo_jax.train import loop, metrics, streams

EMBEDDING_FILE = router_init.EMBEDDING_FILE


def check_vocabulary(vocab, cfg: ModelConfig, spec: str) -> None:
  if vocab.vocab_size > cfg.vocab_size:
    raise ValueError(f"Vocabulary {spec!r} has {vocab.vocab_size} ids but the model's vocab_size "
                     f"is {cfg.vocab_size}.")


def eval_tasks(data_dir: str, eval_data: Mapping[str, Sequence[str]], vocab) -> dict[str, str]:
  return {name: tasks.register_corpus(name, paths.absolute_all(files), data_dir=data_dir,
                                     vocabulary=vocab, require=("validation",))
          for name, files in eval_data.items()}


def fit(cfg: ModelConfig, init_from: str | None, name: str, task: str, evals: dict,
        train: loop.TrainConfig, rules: sharding.ShardingRules, output_dir: str):
  """(TrainResult, model function): the dense model trained on ``task`` from a fresh init or
  from the saved model ``init_from`` (restored onto the mesh)."""
  model_fn = pure_model(cfg)
  mesh = sharding.make_mesh(train.mesh)
  shardings = model_fn.shardings(mesh, rules)
  initial = (model_fn.init(train.seed) if init_from is None else
             store.load_params(init_from, jax.tree.map(
                 lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                 model_fn.abstract.to_pure_dict(), shardings)))
  trainer = loop.Trainer(
      train, workdir=output_dir, mesh=mesh, rules=rules,
      apply=lambda p, _, b: run_on_batch(model_fn, p, b),
      params=initial, frozen={}, param_shardings=shardings, frozen_shardings={},
      stream=streams.train_stream(task, train),
      eval_streams={n: streams.eval_stream(t, train) for n, t in evals.items()},
      flops_per_token=metrics.flops_per_token(cfg, train.seq_len))
  return trainer.train(), model_fn


def save_dense(output_dir: str, name: str, cfg: ModelConfig, result, anchor_manifest: dict,
               data, train) -> str:
  """A dense baseline: the public model continued on domain ``name``."""
  out = os.path.join(output_dir, "model")
  manifest = {"kind": "dense", "name": name, "config": store.config_to_json(cfg),
              "vocabulary": anchor_manifest["vocabulary"],
              "anchor_fingerprint": anchor_manifest["fingerprint"],
              "fingerprint": store.fingerprint(result.params),
              "data_card": streams.data_card(name, data, result, train)}
  store.save(out, result.params, manifest, overwrite=True)
  print(f"dense model {name!r} -> {out}")
  return out


def save_public(output_dir: str, cfg: ModelConfig, result, model_fn, task: str, vocabulary: str,
                data, train, embedding_documents: int) -> str:
  """The public model with its domain embedding (the public router row of every expert)."""
  embedding = router_init.domain_embedding(
      model_fn, result.params, tasks.lm_batches(task, seq_len=train.seq_len, batch_size=8,
                                                shuffle=True, seed=train.seed, num_epochs=1,
                                                shard_index=0, num_shards=1),   # same on every host
      embedding_documents, moments=True)
  out = os.path.join(output_dir, "model")
  spec, extra = vocabularies.saved_files(vocabulary)
  emb_path = os.path.join(output_dir, EMBEDDING_FILE)
  if jax.process_index() == 0:
    np.savez(emb_path, **embedding)
  extra[EMBEDDING_FILE] = emb_path
  manifest = {
      "kind": "public", "config": store.config_to_json(cfg),
      "vocabulary": {"spec": spec, **vocabularies.identity(vocabulary)},
      "fingerprint": store.fingerprint(result.params),
      "data_card": streams.data_card("public", data, result, train),
  }
  store.save(out, result.params, manifest, overwrite=True, extra_files=extra)
  print(f"public model -> {out}")
  return out


@gin.configurable(module="flexolmo")
def pretrain(output_dir: str = gin.REQUIRED, data: Sequence[str] = gin.REQUIRED,
             eval_data: Mapping[str, Sequence[str]] | None = None, vocabulary: str = "byte",
             train: loop.TrainConfig | None = None, model: ModelConfig | None = None,
             embedding_documents: int = 1000, rules: sharding.ShardingRules | None = None,
             init_from: str | None = None, name: str = "public"):
  """Trains the public model; returns (TrainResult, model directory or None if preempted).

  With ``init_from`` (a public model) it continues that model on ``data`` instead: the dense
  baseline of domain ``name`` (kind ``dense``, ``train-dense``); the config and vocabulary are
  the public model's."""
  train, cfg = train or loop.TrainConfig(), model or ModelConfig()
  rules = rules or sharding.ShardingRules()
  init_path = anchor = None
  if init_from is not None:
    init_path, anchor, cfg = saved.open_public(init_from)
    vocabulary = saved.vocabulary_spec(init_path, anchor)
  if cfg.is_moe:
    raise ValueError(f"pretrain trains the dense public model, but the config has experts "
                     f"{list(cfg.experts)}.")
  data, output_dir = paths.absolute_all([data] if isinstance(data, str) else data), \
      paths.absolute(output_dir)
  loop.check_seq_len(train, cfg.max_seq_len)
  store.refuse_to_replace(os.path.join(output_dir, "model"), train.steps)
  vocab = vocabularies.load(vocabulary)
  check_vocabulary(vocab, cfg, vocabulary)
  write_gin_config(output_dir)
  data_dir = os.path.join(output_dir, "data")
  task = tasks.register_corpus(name, data, data_dir=data_dir, vocabulary=vocab)
  evals = {**({name: task} if tasks.has_split(task, "validation") else {}),
           **eval_tasks(data_dir, eval_data or {}, vocab)}
  result, model_fn = fit(cfg, init_path, name, task, evals, train, rules, output_dir)
  if result.preempted:
    return result, None
  if anchor is not None:
    return result, save_dense(output_dir, name, cfg, result, anchor, data, train)
  return result, save_public(output_dir, cfg, result, model_fn, task, vocabulary, data, train,
                             embedding_documents)
