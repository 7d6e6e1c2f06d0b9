"""Dense baselines continued from the public model, model soup and the BTM ensemble."""
import os

import jax
import numpy as np
import pytest

from flexolmo_jax import cli
from flexolmo_jax.checkpoint import store
from flexolmo_jax.eval import baselines, perplexity
from flexolmo_jax.train import pretrain
from tests.fixtures import train_config
from tests.helpers import lm_batch


def naive_btm(logp, positions, tau, top_k=None):
  """Loop oracle: weights from the summed NLL of the document's earlier tokens."""
  m, b, t = logp.shape
  out = np.zeros((b, t))
  for i in range(b):
    for j in range(t):
      start = j - positions[i, j]
      context = -logp[:, i, start:j].sum(axis=1)
      s = -context / tau
      if top_k is not None:
        s = np.where(s >= np.sort(s)[-top_k], s, -np.inf)
      w = np.exp(s - s.max())
      w /= w.sum()
      out[i, j] = np.log(np.sum(w * np.exp(logp[:, i, j])))
  return out


@pytest.mark.parametrize("top_k", [None, 2])
def test_btm_mixture_equals_the_loop_oracle(top_k):
  rs = np.random.RandomState(0)
  logp = np.log(rs.uniform(0.01, 1.0, (3, 2, 12)))
  positions = np.array([list(range(5)) + list(range(7)), list(range(12))])
  got = baselines.ensemble_logprobs(logp, positions, tau=0.7, top_k=top_k)
  np.testing.assert_allclose(np.asarray(got), naive_btm(logp, positions, 0.7, top_k), rtol=1e-5)


@pytest.fixture(scope="module")
def dense(public, flexmix, tmp_path_factory):
  out = {}
  for name in ("code", "math"):
    run = tmp_path_factory.mktemp(f"dense_{name}")
    _, out[name] = pretrain.pretrain(output_dir=str(run), data=[flexmix[name]],
                                     train=train_config(60), init_from=public["run"], name=name)
  return out


@pytest.mark.slow
def test_dense_soup_and_btm(public, dense, flexmix, tmp_path):
  manifest = store.read_manifest(dense["code"], "dense")
  assert manifest["anchor_fingerprint"] == store.read_manifest(public["model"])["fingerprint"]
  soup = baselines.soup(list(dense.values()), str(tmp_path / "soup"))
  members = [perplexity.load_dense(p)[1] for p in dense.values()]
  averaged = perplexity.load_dense(soup)[1]
  jax.tree.map(lambda s, a, b: np.testing.assert_allclose(s, (np.float64(a) + b) / 2, rtol=1e-6),
               averaged, *members)
  assert cli.main(["btm", "--dense", dense["code"], "--dense", dense["math"], "--tau", "1.0",
                   "--out", str(tmp_path / "btm")]) == 0
  scorer, _ = perplexity.open_model(str(tmp_path / "btm"))
  batch = lm_batch(256, batch=2, length=32)
  logps = np.stack([np.asarray(perplexity.model_scorer(
      store.config_from_json(manifest["config"], "code"), p)(batch)) for p in members])
  np.testing.assert_allclose(np.asarray(scorer(batch)),
                             naive_btm(logps, batch["decoder_positions"], 1.0), atol=1e-5)
  # Every baseline evaluates like any model.
  json_path = tmp_path / "losses.json"
  for model in (dense["code"], soup, str(tmp_path / "btm")):
    assert cli.main(["eval", "--model", model, "--data", f"code={flexmix['code']}",
                     "--seq-len", "128", "--batch-size", "8", "--json", str(json_path)]) == 0
    assert os.path.getsize(json_path) > 0
  with pytest.raises(ValueError, match="at least 2 dense models"):
    baselines.soup([dense["code"]], str(tmp_path / "one"))
