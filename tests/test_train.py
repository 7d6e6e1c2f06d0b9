"""Pre-training and expert training on FlexMix-mini: learning, frozen anchor, artifact, bad input."""
import json
import os
import re

import jax
import numpy as np
import pytest

from flexolmo_jax import cli
from flexolmo_jax.checkpoint import store
from flexolmo_jax.flexolmo import expert, router_init
from flexolmo_jax.model.transformer import pure_model
from tests.helpers import lm_batch, tiny


def test_initial_two_expert_model_equals_the_public_model():
  """The new expert starts as a copy: with top-2 of 2 the probabilities sum to 1, so the MoE
  output is the public FFN's whatever the router rows are."""
  cfg = tiny()
  dense = pure_model(cfg)
  anchor = dense.init(3)
  ecfg = expert.ExpertConfig(negative_bias_init=-0.5)
  moe = pure_model(expert.expert_config(cfg, "code", ecfg))
  rs = np.random.RandomState(0)
  r_pub, r_own = (rs.normal(size=(cfg.n_layers, cfg.d_model)).astype(np.float32) for _ in "ab")
  params = expert.assemble(anchor, r_pub, expert.initial_expert(anchor, r_own, ecfg))
  batch = lm_batch(cfg.vocab_size, 2, 32)
  kw = dict(positions_bt=batch["decoder_positions"], segment_ids_bt=batch["decoder_segment_ids"])
  want, _ = dense(anchor, batch["decoder_input_tokens"], **kw)
  got, aux = moe(params, batch["decoder_input_tokens"], **kw)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
  assert aux.router_z_loss > 0


def test_a_bf16_anchor_is_the_public_model_rounded_once_and_the_expert_stays_fp32():
  """anchor_dtype='bfloat16' holds the frozen model in half the bytes; the step computes what
  an fp32 anchor holding the same rounded values computes, and the expert's gradients are fp32."""
  import jax.numpy as jnp

  cfg = tiny()
  anchor = pure_model(cfg).init(3)
  ecfg = expert.ExpertConfig(anchor_dtype="bfloat16")
  moe = pure_model(expert.expert_config(cfg, "code", ecfg))
  held = expert.hold_anchor(anchor, ecfg)
  assert {a.dtype for a in jax.tree.leaves(held)} == {jnp.dtype("bfloat16")}
  rounded = jax.tree.map(lambda a: a.astype(jnp.float32), held)
  rows = jnp.ones((cfg.n_layers, cfg.d_model), jnp.float32)
  params = expert.initial_expert(anchor, rows, ecfg)
  tokens = lm_batch(cfg.vocab_size, 2, 16)["decoder_input_tokens"]

  def loss(p, frozen):
    return jnp.mean(moe(expert.assemble(frozen, rows, p), tokens)[0] ** 2)

  got, want = jax.grad(loss)(params, held), jax.grad(loss)(params, rounded)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert a.dtype == jnp.float32
    np.testing.assert_array_equal(a, b)
  assert expert.hold_anchor(anchor, expert.ExpertConfig()) is anchor
  with pytest.raises(ValueError, match="anchor_dtype"):
    expert.ExpertConfig(anchor_dtype="int8")


def test_domain_embedding_matches_a_naive_mean():
  cfg = tiny()
  model = pure_model(cfg)
  params = model.init(0)
  batch = lm_batch(cfg.vocab_size, 2, 32)
  emb = router_init.domain_embedding(model, params, [batch], num_documents=3)
  _, _, hidden = model(params, batch["decoder_input_tokens"], positions_bt=batch["decoder_positions"],
                       segment_ids_bt=batch["decoder_segment_ids"], return_hidden=True)
  docs, layers = [], []
  for row in range(2):
    for seg in (1, 2):
      m = batch["decoder_segment_ids"][row] == seg
      v = np.asarray(hidden.final)[row][m].mean(0)
      docs.append(v / np.linalg.norm(v))
      per = np.asarray(hidden.router_inputs)[:, row][:, m].mean(1)
      layers.append(per / np.linalg.norm(per, axis=-1, keepdims=True))
  assert int(emb["documents"]) == 3    # the first three segments, in order
  np.testing.assert_allclose(emb["shared"], np.mean(docs[:3], 0), atol=1e-5)
  np.testing.assert_allclose(emb["per_layer"], np.mean(layers[:3], 0), atol=1e-5)
  rows = router_init.random_rows(jax.random.key(0), 2, 64)
  assert rows.min() >= -0.006 and rows.max() <= 0.0


def test_token_moments_match_a_naive_mean_and_covariance():
  cfg = tiny()
  model = pure_model(cfg)
  params = model.init(0)
  batches = [lm_batch(cfg.vocab_size, 2, 32, seed=s) for s in (0, 1)]
  emb = router_init.domain_embedding(model, params, batches, num_documents=100, moments=True)
  xs = []
  for batch in batches:
    _, _, hidden = model(params, batch["decoder_input_tokens"],
                         positions_bt=batch["decoder_positions"],
                         segment_ids_bt=batch["decoder_segment_ids"], return_hidden=True)
    real = batch["decoder_segment_ids"] > 0
    xs.append(np.asarray(hidden.router_inputs, np.float64)[:, real])       # [L, n, d]
  x = np.concatenate(xs, axis=1)
  assert int(emb["tokens"]) == x.shape[1]
  np.testing.assert_allclose(emb["token_mean"], x.mean(axis=1), atol=1e-4)
  for layer in range(cfg.n_layers):
    np.testing.assert_allclose(emb["token_cov"][layer], np.cov(x[layer].T, bias=True),
                               atol=2e-3, rtol=1e-3)


def test_classifier_rows_are_the_bayes_log_odds_of_two_gaussians():
  """With equal covariances the discriminant is exact: w.x + b equals log N(x; m_o, C) -
  log N(x; m_p, C) - log(public_odds) at any x (ridge 0)."""
  rs = np.random.RandomState(0)
  d, layers = 6, 2
  a = rs.randn(layers, d, d)
  cov = a @ a.transpose(0, 2, 1) + d * np.eye(d)
  own = {"token_mean": rs.randn(layers, d), "token_cov": cov}
  public = {"token_mean": rs.randn(layers, d), "token_cov": cov}
  w, b = router_init.classifier_rows(own, public, public_odds=4.0, ridge=0.0)
  x = rs.randn(layers, d)

  def log_density(m, c, v):
    diff = v - m
    return -0.5 * diff @ np.linalg.solve(c, diff)       # the normalizers cancel
  for layer in range(layers):
    want = (log_density(own["token_mean"][layer], cov[layer], x[layer])
            - log_density(public["token_mean"][layer], cov[layer], x[layer]) - np.log(4.0))
    np.testing.assert_allclose(w[layer] @ x[layer] + b[layer], want, rtol=1e-4, atol=1e-4)
  with pytest.raises(KeyError, match="token_cov"):
    router_init.classifier_rows({"token_mean": own["token_mean"]}, public, 4.0)
  with pytest.raises(ValueError, match="router_public_odds"):
    expert.ExpertConfig(router_public_odds=0.0)


def test_router_init_scale_stretches_the_owner_row_away_from_the_public_one(tmp_path):
  rs = np.random.RandomState(0)
  public = {"shared": rs.randn(64).astype(np.float32),
            "per_layer": rs.randn(2, 64).astype(np.float32)}
  np.savez(tmp_path / router_init.EMBEDDING_FILE, **public)
  owner = {"shared": rs.randn(64).astype(np.float32),
           "per_layer": rs.randn(2, 64).astype(np.float32)}
  for mode in ("shared", "per_layer"):
    rows = lambda scale: expert.router_rows(mode, str(tmp_path), {"fingerprint": "0" * 16},
                                            tiny(), owner, 0, scale)[:2]
    r_pub, plain = rows(1.0)
    np.testing.assert_array_equal(plain, router_init.rows_for(mode, owner, 2, 64))
    same_pub, stretched = rows(4.0)
    np.testing.assert_array_equal(same_pub, r_pub)
    np.testing.assert_allclose(stretched, r_pub + 4.0 * (plain - r_pub), rtol=1e-6, atol=1e-6)
    _, orthogonal, bias = expert.router_rows(mode, str(tmp_path), {"fingerprint": "0" * 16},
                                             tiny(), owner, 0, 4.0, orthogonal=True)
    assert bias is None
    delta = (orthogonal - r_pub) / 4.0
    np.testing.assert_allclose(np.sum(delta * r_pub, axis=-1), 0.0, atol=1e-4)
    np.testing.assert_allclose(np.sum((plain - r_pub - delta) * delta, axis=-1), 0.0, atol=1e-4)
  with pytest.raises(ValueError, match="router_init_scale"):
    expert.ExpertConfig(router_init_scale=0.0)


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def fake_public(tmp_path_factory):
  """A saved tiny public model (untrained): enough for the checks that run before training."""
  root = tmp_path_factory.mktemp("fake_public")
  cfg = tiny()
  params = pure_model(cfg).init(0)
  manifest = {"kind": "public", "config": store.config_to_json(cfg),
              "vocabulary": {"spec": "byte", "kind": "byte", "size": 259},
              "fingerprint": store.fingerprint(params), "data_card": {}}
  path = store.save(str(root / "model"), params, manifest)
  text = root / "owner.jsonl"
  text.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x + {i}\n" * 20}) + "\n"
                          for i in range(40)))
  return {"root": root, "model": path, "text": str(text)}


def run_cli(args, capsys):
  code = cli.main(args)
  return code, capsys.readouterr().err


def expert_args(fake_public, out, **changes):
  args = {"--public": fake_public["model"], "--name": "code", "--data": fake_public["text"],
          "--out": str(out), "--steps": "1"}
  args.update(changes)
  return [x for k, v in args.items() if v is not None for x in (k, v)]


@pytest.mark.parametrize("change, message", [
    ({"--public": "/nonexistent/model"}, "/nonexistent/model does not exist"),
    ({"--name": "public"}, "reserved for the public model"),
    ({"--name": "a,b"}, "Invalid expert name"),
])
def test_train_expert_rejects_bad_input_before_training(fake_public, tmp_path, capsys, change,
                                                        message):
  code, err = run_cli(["train-expert", *expert_args(fake_public, tmp_path / "out", **change)],
                      capsys)
  assert code == 2 and message in err
  assert not os.path.exists(tmp_path / "out" / "checkpoints")


def test_train_expert_rejects_a_model_that_is_not_dense_public(fake_public, tmp_path, capsys):
  cfg = tiny(experts=("public", "code"), top_k=2)
  params = pure_model(cfg).init(0)
  art = store.save(str(tmp_path / "expert"), params,
                   {"kind": "expert", "config": store.config_to_json(cfg)})
  code, err = run_cli(["train-expert", *expert_args(fake_public, tmp_path / "out",
                                                    **{"--public": art})], capsys)
  assert code == 2 and "not a dense public model" in err
  partial = tmp_path / "partial"
  partial.mkdir()
  code, err = run_cli(["train-expert", *expert_args(fake_public, tmp_path / "out",
                                                    **{"--public": str(partial)})], capsys)
  assert code == 2 and "manifest.json is missing" in err


def test_train_expert_rejects_another_vocabulary(fake_public, tmp_path, capsys):
  import sentencepiece as spm

  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n".join(f"line {i} of some text for a vocabulary" for i in range(300)))
  spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"),
                                 vocab_size=40, minloglevel=2)
  code, err = run_cli(["train-expert", *expert_args(fake_public, tmp_path / "out"),
                       "--vocabulary", str(tmp_path / "sp.model")], capsys)
  assert code == 2 and re.search(r"is sentencepiece \(40 ids, sha256 \w+\), but the public model "
                                 r".* was trained with byte \(259 ids\)", err), err
  assert not os.path.exists(tmp_path / "out" / "checkpoints")


def test_gin_errors_are_reported_before_training(fake_public, tmp_path, capsys):
  bad = tmp_path / "bad.gin"
  bad.write_text("flexolmo.TrainConfig.stepz = 3\n")
  code, err = run_cli(["train-expert", *expert_args(fake_public, tmp_path / "out"),
                       "--gin-file", str(bad)], capsys)
  assert code == 2 and "stepz" in err and "bad.gin" in err
  code, err = run_cli(["train-expert", *expert_args(fake_public, tmp_path / "out"),
                       "--gin.flexolmo.ExpertConfig.topk=1"], capsys)
  assert code == 2 and "topk" in err
  code, err = run_cli(["train-expert", "--public", fake_public["model"], "--name", "code",
                       "--out", str(tmp_path / "out")], capsys)      # no --data
  assert code == 2 and "missing required setting DATA (--data)" in err
  assert not os.path.exists(tmp_path / "out" / "checkpoints")


def test_flags_and_gin_bindings_reach_the_run_and_are_written_out(fake_public, tmp_path, capsys):
  out = tmp_path / "out"
  code, err = run_cli(["train-expert", *expert_args(fake_public, out), "--seq-len", "64",
                       "--batch-size", "8", "--gin.TOP_K=1", "--router-init", "random",
                       "--checkpoint-every", "1", "--gin.flexolmo.TrainConfig.peak_tflops=1.0"],
                      capsys)
  assert code == 0, err
  written = (out / "config.gin").read_text()
  assert "TOP_K = 1" in written and "ROUTER_INIT = 'random'" in written and "SEQ_LEN = 64" in written
  art = store.read_manifest(str(out / "expert"), "expert")
  assert art["config"]["top_k"] == 1 and art["data_card"]["train_config"]["seq_len"] == 64
