"""Configuration: gin presets and clear errors for bad input."""
import pytest
from flax import nnx

from flexolmo_jax import cli
from flexolmo_jax.config import ModelConfig, load_model_config
from flexolmo_jax.model.transformer import Transformer, select_experts
from tests.helpers import tiny, tokens


def test_presets_have_the_published_shapes():
  cfg = load_model_config("olmo2_7b")
  assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.vocab_size) == (
      32, 4096, 32, 11008, 100352)
  assert cfg.num_params() == 7_298_617_344          # OLMo-2 7B: 7.30B parameters
  flex = load_model_config("flexolmo_7x7b")
  assert flex.num_experts == 7 and flex.top_k == 5 and flex.experts[0] == "public"
  assert flex.num_params() == 33_270_665_216        # FlexOlmo-7x7B: 33.3B total
  assert 100e6 < load_model_config("small").num_params() < 120e6
  assert load_model_config("olmo2_1b").n_layers == 16
  assert load_model_config("tiny", ["flexolmo.ModelConfig.d_model = 32"]).d_model == 32


def test_unknown_preset_lists_the_known_ones():
  with pytest.raises(FileNotFoundError, match="known presets are.*tiny"):
    load_model_config("olmo3_huge")


def test_top_k_larger_than_experts_is_rejected():
  with pytest.raises(ValueError, match="top_k=3 is larger than the 2 experts"):
    ModelConfig(experts=("public", "code"), top_k=3)


def test_unknown_backend_is_rejected():
  with pytest.raises(ValueError, match="unknown dispatch backend 'sparse'"):
    Transformer(ModelConfig(dispatch="sparse"), nnx.Rngs(0))


def test_duplicate_expert_names_are_rejected():
  with pytest.raises(ValueError, match="Duplicate expert name 'code'"):
    ModelConfig(experts=("public", "code", "code"))


def test_expert_selection_errors_and_clamp():
  cfg = tiny(experts=("public", "code", "math"), top_k=2)
  with pytest.raises(ValueError, match=r"Unknown expert\(s\) \['poetry'\]"):
    select_experts(cfg, ["public", "poetry"])
  with pytest.raises(ValueError, match="top_k=2 is larger than the 1 experts selected"):
    select_experts(cfg, ["code"])
  assert select_experts(cfg.replace(top_k_policy="clamp"), ["code"]) == ((1,), 1)
  assert select_experts(cfg, "math,public") == ((0, 2), 2)
  with pytest.raises(ValueError, match="dense model"):
    select_experts(tiny(), ["public"])
  model = Transformer(cfg, nnx.Rngs(0))
  with pytest.raises(ValueError, match="poetry"):
    model(tokens(cfg), experts=["poetry"])


def test_cli_info_and_errors(capsys):
  assert cli.main(["info", "--model", "flexolmo_7x7b"]) == 0
  assert "33,270,665,216 total" in capsys.readouterr().out
  assert cli.main(["info", "--model", "tiny", "--experts", "public,a", "--top-k", "3"]) == 2
  assert "top_k=3 is larger than the 2 experts" in capsys.readouterr().err
