"""DP-SGD expert training (flexolmo_jax/privacy): clipping, noise, accounting, documents, router."""
import os
import shutil
import jax
import numpy as np
import pytest
from flexolmo_jax.checkpoint import store
from flexolmo_jax.flexolmo import router_init
from flexolmo_jax.privacy import documents
from tests.test_dp import dp_train, independent_epsilon, random_public, write_owner
WEIGHT = documents.WEIGHT_KEY


@pytest.mark.slow
def test_dp_expert_training_records_its_guarantee_and_resumes_exactly(tmp_path, capsys):
  public, cfg, anchor = random_public(tmp_path / "public")
  data = write_owner(tmp_path)
  result, artifact = dp_train(public, data, tmp_path / "run")
  manifest = store.read_manifest(artifact)
  dp = manifest["data_card"]["dp"]
  docs = dp["documents"]
  assert dp["steps"] == 6 and dp["batch_size"] == 8 and dp["sampling_rate"] == 8 / docs
  assert dp["epsilon"] == independent_epsilon(8 / docs, dp["noise_multiplier"], 6, 1e-5,
                                              router_sigma=10.0)
  assert 0.99 * 6.0 < dp["epsilon"] <= 6.0
  assert {"delta", "clip", "accountant", "router_init", "epsilon_training_only"} <= set(dp)
  assert result.documents_seen > 0 and result.step == 6
  # The frozen public model is bit-identical after DP training.
  for a, b in zip(jax.tree.leaves(anchor), jax.tree.leaves(result.frozen["anchor"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The router rows come from the noised mean, not from the exact one.
  emb = dict(np.load(os.path.join(artifact, router_init.DOMAIN_EMBEDDING_FILE)))
  assert int(emb["documents"]) == docs
  # An interrupted run (its last checkpoint lost) resumes and ends bit-identical: same batches,
  # same noise.
  final = store.load_params(artifact)
  shutil.rmtree(tmp_path / "run" / "checkpoints" / "6")
  shutil.rmtree(artifact)
  capsys.readouterr()
  _, again = dp_train(public, data, tmp_path / "run")
  logged = capsys.readouterr()
  assert "resume" in logged.out + logged.err
  for key, value in store.load_params(again).items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(final[key]), err_msg=key)
  # merge and eval show each expert's guarantee.
  from flexolmo_jax import cli
  assert cli.main(["merge", "--public", public, "--expert", again,
                   "--out", str(tmp_path / "merged")]) == 0
  out = capsys.readouterr().out
  assert f"law: DP epsilon {dp['epsilon']:.3g}" in out and "public: no differential privacy" in out
  cli.print_privacy(str(tmp_path / "merged"))       # what `flexolmo eval` prints first
  out = capsys.readouterr().out
  assert f"law: DP epsilon {dp['epsilon']:.3g} at delta 1e-05" in out
  assert "public: no differential privacy" in out
