"""DP-SGD expert training (flexolmo_jax/privacy): clipping, noise, accounting, documents, router."""
import json
import os

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexolmo_jax.data import tasks, vocabularies
from flexolmo_jax.flexolmo import expert, router_init
from flexolmo_jax.model.transformer import pure_model, run_on_batch
from flexolmo_jax.privacy import accounting, documents, dpsgd
from flexolmo_jax.privacy import router as private_router
from flexolmo_jax.train import loop
from tests.helpers import save_random_public, tiny

WEIGHT = documents.WEIGHT_KEY


def quadratic(params, example):
  """0.5 ||p - x||^2: the per-example gradient is p - x, whose norm the test chooses."""
  return 0.5 * jnp.sum((params["p"] - example["x"]) ** 2), {}


def test_each_documents_contribution_is_clipped_to_the_bound():
  clip = 2.0
  x = np.zeros((6, 5), np.float32)
  norms = [0.5, 1.9, 2.0, 3.0, 10.0, 1000.0]     # under, at and far over the bound
  for i, n in enumerate(norms):
    x[i, i % 5] = n
  weight = np.ones(6, np.float32)
  params = {"p": jnp.zeros(5)}
  grad = dpsgd.private_gradient(quadratic, clip=clip, noise_multiplier=0.0,
                                expected_batch_size=1.0, microbatch_size=2)
  got, _, grad_norms = grad(params, {"x": x, WEIGHT: weight}, jax.random.key(0))
  # Oracle: sum_i g_i * min(1, C / ||g_i||), with g_i = -x_i.
  want = sum(-x[i] * min(1.0, clip / n) for i, n in enumerate(norms))
  np.testing.assert_allclose(np.asarray(got["p"]), want, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(grad_norms), norms, rtol=1e-6)
  # Removing any one example moves the sum by at most C (the sensitivity the accountant uses).
  for i in range(6):
    w = weight.copy()
    w[i] = 0.0
    without, _, _ = grad(params, {"x": x, WEIGHT: w}, jax.random.key(0))
    moved = np.linalg.norm(np.asarray(got["p"]) - np.asarray(without["p"]))
    assert moved <= clip * (1 + 1e-6), (i, moved)
    assert moved == pytest.approx(min(norms[i], clip), rel=1e-5)


def test_noise_has_the_configured_standard_deviation():
  """With every example weighted 0 the output is the noise alone, divided by the batch size:
  N(0, (sigma C / B)^2) per entry. 400,000 draws: the sample std is within 0.5% (about 2.2
  standard errors would be 0.25%) and the mean within 4 standard errors of 0."""
  sigma, clip, batch = 1.3, 0.7, 16.0
  params = {"p": jnp.zeros(300_000), "q": jnp.zeros((100, 1000))}
  grad = dpsgd.private_gradient(
      lambda p, ex: (jnp.sum(p["p"]) * 0 + jnp.sum((p["q"] - ex["x"]) ** 2), {}), clip=clip,
      noise_multiplier=sigma, expected_batch_size=batch, microbatch_size=4)
  out, _, _ = grad(params, {"x": np.ones((4, 100, 1000), np.float32), WEIGHT: np.zeros(4)},
                   jax.random.key(7))
  noise = np.concatenate([np.asarray(out["p"]).ravel(), np.asarray(out["q"]).ravel()])
  want = sigma * clip / batch
  assert abs(noise.std() / want - 1) < 0.005
  assert abs(noise.mean()) < 4 * want / np.sqrt(noise.size)
  # Another step's key draws other noise.
  again, _, _ = grad(params, {"x": np.ones((4, 100, 1000), np.float32), WEIGHT: np.zeros(4)},
                     jax.random.key(8))
  assert abs(np.corrcoef(noise[:300_000], np.asarray(again["p"]))[0, 1]) < 0.01


def doc_set(rows, seq_len, chunks=1):
  """Documents from token lists (EOS included), as documents.load lays them out."""
  keep = chunks * seq_len
  tokens = np.zeros((len(rows), keep), np.int32)
  for i, r in enumerate(rows):
    tokens[i, :len(r[:keep])] = r[:keep]
  return documents.Documents(tokens, np.array([min(len(r), keep) for r in rows]), chunks,
                             seq_len, 0, 0)


def test_dp_gradient_of_the_expert_equals_a_per_document_loop():
  """No clipping (C huge) and no noise: the DP step's gradient is the mean over documents of each
  document's gradient, computed here one document at a time; the padding example adds nothing."""
  cfg = tiny()
  anchor = pure_model(cfg).init(1)
  ecfg = expert.ExpertConfig()
  moe = pure_model(expert.expert_config(cfg, "law", ecfg))
  rs = np.random.RandomState(0)
  r_pub, r_own = (0.1 * rs.normal(size=(cfg.n_layers, cfg.d_model)).astype(np.float32)
                  for _ in "ab")
  params = expert.initial_expert(anchor, r_own, ecfg)
  params["w_up"] = params["w_up"] * 1.1        # the expert differs from the public FFN
  frozen = {"anchor": anchor, "public_router": jnp.asarray(r_pub)}

  def apply(p, fz, batch):
    return run_on_batch(moe, expert.assemble(fz["anchor"], fz["public_router"], p), batch)

  docs = doc_set([list(rs.randint(3, cfg.vocab_size, size=n)) + [1] for n in (5, 40, 17)],
                 seq_len=16, chunks=2)
  batch = documents.examples(docs, np.array([2, 0, 1]), pad_to=4)
  assert batch[WEIGHT].tolist() == [1, 1, 1, 0]
  loss_fn = lambda p, ex: dpsgd.example_loss(apply, p, frozen, ex, 1e-4)
  grad = dpsgd.private_gradient(loss_fn, clip=1e9, noise_multiplier=0.0,
                                expected_batch_size=3.0, microbatch_size=2)
  got, _, _ = jax.jit(grad)(params, batch, jax.random.key(0))
  want = None
  one_grad = jax.jit(jax.grad(lambda p, one: loss_fn(p, one)[0]))
  for row in range(3):
    one = {k: v[row] for k, v in batch.items() if k != WEIGHT}
    g = one_grad(params, one)
    want = g if want is None else jax.tree.map(jnp.add, want, g)
  for key in params:
    np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want[key]) / 3, rtol=2e-4,
                               atol=1e-7, err_msg=key)


def test_documents_are_whole_examples_and_the_sampling_resumes(tmp_path):
  texts = ["short one", "x" * 50, "a medium length document here", "y" * 7]
  path = tmp_path / "own.jsonl"
  path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
  task = tasks.register_corpus("dpdocs", [str(path)], data_dir=str(tmp_path / "data"),
                               vocabulary=vocabularies.load("byte"), require=())
  docs = documents.load(task, seq_len=8, chunks=2)
  vocab = vocabularies.load("byte")
  assert docs.count >= 3      # a small validation split may take one
  for row, length in zip(docs.tokens, docs.lengths):
    ids = row[:length].tolist()
    assert ids[-1] == vocab.eos_id or length == 16
    assert (row[length:] == 0).all()
  text_ids = sorted(tuple(list(vocab.encode(t)) + [vocab.eos_id])[:16] for t in texts)
  assert all(tuple(r[:n]) in text_ids for r, n in zip(docs.tokens, docs.lengths))
  assert docs.dropped_tokens == sum(max(len(vocab.encode(t)) + 1 - 16, 0) for t in texts
                                    if tuple(list(vocab.encode(t)) + [1])[:16] in
                                    {tuple(r[:n]) for r, n in zip(docs.tokens, docs.lengths)})
  ex = documents.examples(docs, np.array([1, 0]), pad_to=4)
  assert ex["decoder_target_tokens"].shape == (4, 2, 8)
  flat = ex["decoder_target_tokens"].reshape(4, 16)
  np.testing.assert_array_equal(flat[0], docs.tokens[1])
  np.testing.assert_array_equal(ex["decoder_input_tokens"][:, :, 1:],
                                ex["decoder_target_tokens"][:, :, :-1])
  assert (ex["decoder_input_tokens"][:, :, 0] == 0).all()
  assert (ex["decoder_loss_weights"][2:] == 0).all() and ex[WEIGHT].tolist() == [1, 1, 0, 0]
  # Poisson batches vary in size; fixed ones do not; either resumes at any step.
  for sampling in ("poisson", "fixed"):
    make = documents.stream(docs, sampling, batch_size=2, steps=12, seed=3, pad_to=2)
    whole = list(make(0))
    assert len(whole) == 12
    resumed = list(make(5))
    for a, b in zip(whole[5:], resumed):
      np.testing.assert_array_equal(a["decoder_target_tokens"], b["decoder_target_tokens"])
    sizes = {int(b[WEIGHT].sum()) for b in whole}
    assert sizes == {2} if sampling == "fixed" else len(sizes) > 1


def independent_epsilon(q, sigma, steps, delta, router_sigma=None, replace_one=False,
                        pld=False):
  """The run's epsilon written straight against dp_accounting."""
  half = 2.0 if replace_one else 1.0
  events = [dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma / half)), steps)]
  if router_sigma:
    events.append(dp_accounting.GaussianDpEvent(router_sigma / half))
  acc = dp_accounting.pld.PLDAccountant() if pld else dp_accounting.rdp.RdpAccountant()
  acc.compose(dp_accounting.ComposedDpEvent(events))
  return acc.get_epsilon(delta)


def test_the_reported_epsilon_is_dp_accountings_and_calibration_reaches_the_target():
  cfg = accounting.DPConfig(enabled=True, noise_multiplier=1.1, delta=1e-6)
  g = accounting.plan(cfg, batch_size=32, documents=2000, steps=300)
  assert g.epsilon == independent_epsilon(32 / 2000, 1.1, 300, 1e-6, router_sigma=10.0)
  assert g.epsilon_training_only == independent_epsilon(32 / 2000, 1.1, 300, 1e-6)
  fixed = accounting.DPConfig(enabled=True, noise_multiplier=1.1, sampling="fixed",
                              router_init="proxy", router_proxy=("public.txt",))
  g = accounting.plan(fixed, batch_size=32, documents=2000, steps=300)
  assert g.epsilon == independent_epsilon(32 / 2000, 1.1, 300, 1e-5, replace_one=True)
  assert g.adjacency == "replace_one" and g.router_noise_multiplier is None
  pld = accounting.DPConfig(enabled=True, noise_multiplier=1.1, accountant="pld")
  g = accounting.plan(pld, batch_size=32, documents=2000, steps=100)
  # PLD convolutions are floating-point: composing in another order moves the 12th digit.
  assert g.epsilon == pytest.approx(independent_epsilon(32 / 2000, 1.1, 100, 1e-5,
                                                        router_sigma=10.0, pld=True), rel=1e-9)
  for target in (1.0, 8.0):
    cfg = accounting.DPConfig(enabled=True, target_epsilon=target)
    g = accounting.plan(cfg, batch_size=16, documents=500, steps=200)
    assert g.epsilon <= target * (1 + 1e-6) and g.epsilon > 0.99 * target, g
    assert g.epsilon == independent_epsilon(16 / 500, g.noise_multiplier, 200, 1e-5,
                                            router_sigma=10.0)


@pytest.mark.parametrize("changes, message", [
    (dict(target_epsilon=0.0), "target_epsilon=0.0 must be > 0"),
    (dict(target_epsilon=-1.0), "target_epsilon=-1.0 must be > 0"),
    (dict(delta=1.0), "delta=1.0 must be in (0, 1)"),
    (dict(delta=0.0), "delta=0.0 must be in (0, 1)"),
    (dict(clip=0.0), "clip=0.0 must be > 0"),
    (dict(clip=-2.0), "clip=-2.0 must be > 0"),
    (dict(sampling="shuffle"), "sampling='shuffle' has no accountant"),
    (dict(accountant="moments"), "accountant='moments'"),
    (dict(target_epsilon=None), "exactly one of target_epsilon"),
    (dict(noise_multiplier=1.0), "exactly one of target_epsilon"),
    (dict(router_init="proxy"), "needs router_proxy"),
])
def test_bad_dp_settings_are_refused(changes, message):
  with pytest.raises(ValueError) as err:
    accounting.DPConfig(**{"enabled": True, "target_epsilon": 4.0, **changes})
  assert message in str(err.value)


def write_owner(tmp_path, documents_count=24):
  rs = np.random.RandomState(0)
  words = ["court", "shall", "agreement", "party", "notice", "license", "term", "any"]
  lines = [" ".join(rs.choice(words, size=rs.randint(5, 30))) for _ in range(documents_count)]
  path = tmp_path / "owner.jsonl"
  path.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
  return str(path)


def random_public(path):
  """A saved random public model with a public domain embedding (for r_pub)."""
  public, cfg, anchor = save_random_public(path)
  rs = np.random.RandomState(2)
  np.savez(os.path.join(public, router_init.EMBEDDING_FILE),
           shared=rs.normal(size=cfg.d_model).astype(np.float32),
           per_layer=rs.normal(size=(cfg.n_layers, cfg.d_model)).astype(np.float32),
           documents=np.int64(10))
  return public, cfg, anchor


def dp_train(public, data, out, steps=6, **dp):
  train = loop.TrainConfig(steps=steps, batch_size=8, seq_len=32, warmup_steps=1,
                           checkpoint_every=3, log_every=3, async_checkpoints=False,
                           peak_tflops=1.0)
  cfg = accounting.DPConfig(**{"enabled": True, "target_epsilon": 6.0, "microbatch_size": 4,
                               **dp})
  return expert.train_expert(public=public, name="law", data=[data], output_dir=str(out),
                             train=train, dp=cfg)


def test_a_batch_as_large_as_the_data_is_refused_before_training(tmp_path):
  public, _, _ = random_public(tmp_path / "public")
  data = write_owner(tmp_path, documents_count=6)
  with pytest.raises(ValueError, match="is not below the .* training documents"):
    dp_train(public, data, tmp_path / "run")
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_the_noised_router_mean_is_the_exact_mean_plus_gaussian_noise():
  cfg = tiny()
  model = pure_model(cfg)
  params = model.init(0)
  rs = np.random.RandomState(1)
  docs = doc_set([list(rs.randint(3, cfg.vocab_size, size=n)) + [1] for n in (4, 9, 30, 12, 7)],
                 seq_len=16)
  exact = private_router.noised_mean(model, params, docs, cfg.n_layers, 0.0, seed=0)
  # Oracle: the non-DP domain embedding over the same documents, one per row.
  batch = {k: v[:, 0] for k, v in documents.examples(docs, np.arange(5)).items() if k != WEIGHT}
  want = router_init.domain_embedding(model, params, [batch], num_documents=5)
  np.testing.assert_allclose(exact["shared"], want["shared"], atol=1e-5)
  np.testing.assert_allclose(exact["per_layer"], want["per_layer"], atol=1e-5)
  sigma = 3.0
  noised = private_router.noised_mean(model, params, docs, cfg.n_layers, sigma, seed=0)
  dev = np.concatenate([(noised["shared"] - exact["shared"]).ravel(),
                        (noised["per_layer"] - exact["per_layer"]).ravel()])
  expected = sigma * np.sqrt(1 + cfg.n_layers) / 5
  assert abs(dev.std() / expected - 1) < 0.25, (dev.std(), expected)   # 192 draws
  assert private_router.sensitivity(cfg.n_layers) == np.sqrt(1 + cfg.n_layers)
