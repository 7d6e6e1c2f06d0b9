"""Dense baselines continued from the public model, model soup and the BTM ensemble."""
import os
import jax
import numpy as np
import pytest
from flexolmo_jax import cli
from flexolmo_jax.baselines import btx, soup
from flexolmo_jax.baselines import members as baseline_members
from flexolmo_jax.checkpoint import merged_model, saved, store
from flexolmo_jax.eval import perplexity
from flexolmo_jax.flexolmo import public as pretrain
from flexolmo_jax.model import logprobs
from tests.e2e.fixtures import DEMO_READERS, train_config, validation
from tests.helpers import lm_batch, run_cli
from tests.test_baselines import naive_btm

pytestmark = DEMO_READERS


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
  averaged_dir = soup.soup(list(dense.values()), str(tmp_path / "soup"))
  members = [saved.open_dense(p)[1] for p in dense.values()]
  averaged = saved.open_dense(averaged_dir)[1]
  jax.tree.map(lambda s, a, b: np.testing.assert_allclose(s, (np.float64(a) + b) / 2, rtol=1e-6),
               averaged, *members)
  assert cli.main(["btm", "--dense", dense["code"], "--dense", dense["math"], "--tau", "1.0",
                   "--out", str(tmp_path / "btm")]) == 0
  scorer, _ = perplexity.open_model(str(tmp_path / "btm"))
  batch = lm_batch(256, batch=2, length=32)
  logps = np.stack([np.asarray(logprobs.model_scorer(
      store.config_from_json(manifest["config"], "code"), p)(batch)) for p in members])
  np.testing.assert_allclose(np.asarray(scorer(batch)),
                             naive_btm(logps, batch["decoder_positions"], 1.0), rtol=1e-5,
                             atol=1e-5)   # fp32 prefix sums of NLLs vs the float64 oracle
  # Every baseline evaluates like any model.
  json_path = tmp_path / "losses.json"
  for model in (dense["code"], averaged_dir, str(tmp_path / "btm")):
    assert cli.main(["eval", "--model", model, "--data", f"code={flexmix['code']}",
                     "--seq-len", "128", "--batch-size", "8", "--json", str(json_path)]) == 0
    assert os.path.getsize(json_path) > 0
  with pytest.raises(ValueError, match="at least 2 dense models"):
    soup.soup([dense["code"]], str(tmp_path / "one"))


@pytest.mark.slow
def test_btx_lite(public, dense, flexmix, tmp_path):
  """Dense FFNs become experts, the rest is averaged, the router learns on public data only."""
  out = btx.btx(public["run"], list(dense.values()), str(tmp_path / "btx"))
  manifest = store.read_manifest(out, "merged")
  assert manifest["experts"] == ["public", "code", "math"]
  assert manifest["router"]["source"] == "btx"
  cfg, params = merged_model.load_merged(out)
  assert not cfg.negative_bias and cfg.top_k == 3
  models = {"public": saved.open_dense(public["model"])[1],
            **{n: saved.open_dense(p)[1] for n, p in dense.items()}}
  # Expert e's FFN is model e's, bit for bit; every other weight is the mean of the three.
  ffn = params["blocks"]["ffn"]
  for e, name in enumerate(manifest["experts"]):
    for ours, theirs in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
      np.testing.assert_array_equal(ffn[ours][:, e], models[name]["blocks"]["ffn"][theirs])
  trunk = {k: v for k, v in params.items() if k != "blocks"}
  trunk["blocks"] = {k: v for k, v in params["blocks"].items() if k != "ffn"}
  for path, leaf in store.flatten(trunk).items():
    members = [store.flatten(m)[path] for m in models.values()]
    np.testing.assert_allclose(leaf, np.mean(np.float64(members), axis=0), rtol=1e-6, atol=1e-7,
                               err_msg=path)
  # Opted in to one expert, the MoE is the averaged trunk with that expert's FFN as a dense model.
  one_cfg, one = merged_model.load_merged(out, experts="code")
  dense_cfg = one_cfg.replace(experts=(), top_k=1)
  as_dense = {**one, "blocks": {**one["blocks"], "ffn": {
      "gate_proj": one["blocks"]["ffn"]["w_gate"][:, 0],
      "up_proj": one["blocks"]["ffn"]["w_up"][:, 0],
      "down_proj": one["blocks"]["ffn"]["w_down"][:, 0]}}}
  batch = lm_batch(256, batch=2, length=32)
  np.testing.assert_allclose(np.asarray(logprobs.model_scorer(one_cfg, one)(batch)),
                             np.asarray(logprobs.model_scorer(dense_cfg, as_dense)(batch)),
                             atol=2e-5)
  # The router is trained on the public data alone (no proxy sets, no domain embeddings).
  run = run_cli(["tune-router", "--merged", out, "--proxy-weight", "0",
                 "--data", flexmix["public"], "--out", str(tmp_path / "tune"), "--steps", "60",
                 "--warmup", "6", "--batch-size", "8", "--seq-len", "128", "--log-every", "30"])
  assert run.returncode == 0, run.stderr[-3000:]
  tuned = os.path.join(tmp_path, "tune", "merged")
  record = store.read_manifest(tuned, "merged")["router"]
  assert record["source"] == "tune-router" and record["proxy_segments"] == {}
  assert record["public_sources"] == ["flexmix_public/1.0.0"]
  data = validation(flexmix, ["public", "code", "math"])
  before, after = perplexity.evaluate(out, data), perplexity.evaluate(tuned, data)
  print("BTX-lite validation loss, random router -> tuned on public: "
        + ", ".join(f"{d} {before[d]:.4f} -> {after[d]:.4f}" for d in before))
  assert after["public"] < before["public"]
  json_path = tmp_path / "btx.json"
  assert cli.main(["eval", "--model", tuned, "--exclude", "math", "--data",
                   f"code={flexmix['code']}", "--seq-len", "128", "--batch-size", "8",
                   "--json", str(json_path)]) == 0
  assert os.path.getsize(json_path) > 0
  # A dense model continued from another public model is refused, naming it.
  other = {**store.read_manifest(public["model"]), "fingerprint": "0" * 64}
  with pytest.raises(ValueError, match=r"dense model 'code' .* was continued from public model"):
    baseline_members.check_anchor(baseline_members.read_members(list(dense.values())), "elsewhere", other)
