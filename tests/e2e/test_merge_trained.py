"""The merge of really trained experts rebuilds, bit for bit, the model the trainer ran (the
merge invariants on well-formed artifacts are tests/test_merge.py's)."""

import jax
import numpy as np
import pytest

from flexolmo_jax.checkpoint import merged_model, store
from flexolmo_jax.flexolmo import expert, merge
from tests.helpers import lm_batch, logits_of
from tests.e2e.fixtures import DEMO_READERS

pytestmark = DEMO_READERS


@pytest.fixture(scope="module")
def merged_all(public, experts, code_expert, tmp_path_factory):
  """Every owner's expert, the code owner's being the one trained in the test process."""
  out = tmp_path_factory.mktemp("merged") / "all"
  return merge.merge(public["run"], [code_expert["artifact"] if name == "code" else path
                                     for name, path in experts.items()], str(out))


@pytest.fixture(scope="module")
def tokens():
  return lm_batch(256, batch=2, length=64)["decoder_input_tokens"]


@pytest.mark.slow
def test_merged_pair_equals_the_trained_two_expert_model(public, code_expert, merged_all,
                                                         tmp_path, tokens):
  result = code_expert["result"]
  cfg2 = store.config_from_json(store.read_manifest(code_expert["artifact"])["config"], "code")
  trained = expert.assemble(result.frozen["anchor"], result.frozen["public_router"], result.params)
  reference = logits_of(cfg2, jax.device_get(trained), tokens)

  pair = merge.merge(public["model"], [code_expert["run"]], str(tmp_path / "pair"))
  cfg, params = merged_model.load_merged(pair)
  assert cfg.experts == ("public", "code") and cfg.top_k == 2 and cfg.negative_bias
  np.testing.assert_array_equal(logits_of(cfg, params, tokens), reference)     # bitwise
  # The same pair opted in from the merge of every expert.
  cfg, params = merged_model.load_merged(merged_all, experts="public,code")
  np.testing.assert_array_equal(logits_of(cfg, params, tokens), reference)


