"""export-hf / import-hf against transformers on CPU (tiny random models built here, no hub)."""
import json
import os
import shutil
import sysconfig
import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from flexolmo_jax import cli
from flexolmo_jax.checkpoint import merged_model, store
from flexolmo_jax.convert import export, importer
from flexolmo_jax.convert.safetensors_io import INDEX, SINGLE, TensorReader
from flexolmo_jax.data import vocabularies
from flexolmo_jax.eval import generate
from flexolmo_jax.flexolmo import merge
from flexolmo_jax.model.transformer import pure_model
from tests.helpers import hf_logits
from tests.test_hf_convert import hf_checkpoint, load_hf, merged, ours  # noqa: F401  (the fixture)
BYTE = {"spec": "byte", **vocabularies.identity("byte")}
EXPERTS = ("public", "code", "math", "news")


def assert_same_model(hf_dir, cfg, params):
  ref = load_hf(hf_dir)
  toks = np.random.RandomState(1).randint(3, 259, (2, 40))
  logits, _ = jax.jit(lambda p, t: pure_model(cfg)(p, t))(params, toks)
  np.testing.assert_allclose(np.asarray(logits), hf_logits(ref, toks), atol=1e-4, rtol=0)
  prompt = [int(t) for t in toks[0, :8]]
  theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)[0].tolist()
  mine = generate.generate(cfg, params, [prompt], 32, eos_id=1)[0]
  assert generate.trim(mine, 8, eos_id=1) == theirs
  return ref


@pytest.mark.slow
def test_export_merged_equals_transformers(merged, tmp_path):
  path, _ = merged
  out = export.export_hf(path, str(tmp_path / "hf"), progress=lambda _: None)
  config = json.load(open(os.path.join(out, "config.json")))
  assert config["model_type"] == "flex_olmo" and config["num_experts"] == 4
  assert config["num_experts_per_tok"] == 2 and config["norm_topk_prob"] is False
  assert json.load(open(os.path.join(out, "flexolmo.json")))["experts"] == list(EXPERTS[:1]) + \
      sorted(EXPERTS[1:])
  assert_same_model(out, *ours(path))
  # One expert opted out: a 3-expert FlexOlmo equal to the model loaded without it.
  assert cli.main(["export-hf", "--model", path, "--exclude", "math",
                   "--out", str(tmp_path / "no_math")]) == 0
  assert json.load(open(tmp_path / "no_math" / "config.json"))["num_experts"] == 3
  assert_same_model(str(tmp_path / "no_math"), *ours(path, exclude="math"))


@pytest.mark.slow
def test_export_dense_equals_transformers(merged, tmp_path):
  _, public = merged
  out = export.export_hf(public, str(tmp_path / "hf"), shard_size="100KB",
                         progress=lambda _: None)
  config = json.load(open(os.path.join(out, "config.json")))
  assert config["model_type"] == "olmo2" and config["architectures"] == ["Olmo2ForCausalLM"]
  index = json.load(open(os.path.join(out, INDEX)))
  assert len(set(index["weight_map"].values())) > 1 and not os.path.exists(
      os.path.join(out, SINGLE))
  assert_same_model(out, *ours(public))


def assert_same_tensors(a_dir, b_dir):
  a = {n: TensorReader(a_dir).get(n) for n in TensorReader(a_dir).names()}
  b_reader = TensorReader(b_dir)
  assert b_reader.names() == set(a)
  for name, value in a.items():
    other = b_reader.get(name)
    assert other.dtype == value.dtype and other.shape == value.shape, name
    assert np.array_equal(other.view(np.uint32), value.view(np.uint32)), name


def fuse(src, dst, n_experts, n_layers):
  """The transformers 5.x fused layout of a per-expert checkpoint."""
  os.makedirs(dst)
  shutil.copy(os.path.join(src, "config.json"), dst)
  sd = load_file(os.path.join(src, SINGLE))
  for i in range(n_layers):
    p = f"model.layers.{i}.mlp.experts"
    pop = lambda e, k: sd.pop(f"{p}.{e}.{k}.weight")
    gate_up, down = [], []
    for e in range(n_experts):
      gate_up.append(np.concatenate([pop(e, "gate_proj"), pop(e, "up_proj")]))
      down.append(pop(e, "down_proj"))
    sd[f"{p}.gate_up_proj"], sd[f"{p}.down_proj"] = np.stack(gate_up), np.stack(down)
  save_file(sd, os.path.join(dst, SINGLE), metadata={"format": "pt"})


@pytest.mark.slow
def test_import_then_export_reproduces_the_tensors(tmp_path):
  flex = hf_checkpoint("flex_olmo", str(tmp_path / "flex"))
  assert cli.main(["import-hf", "--hf", flex, "--out", str(tmp_path / "imported"),
                   "--vocabulary", "byte"]) == 0
  manifest = store.read_manifest(str(tmp_path / "imported"), "merged")
  assert manifest["experts"] == ["public", "expert_1", "expert_2", "expert_3"]
  assert cli.main(["export-hf", "--model", str(tmp_path / "imported"),
                   "--out", str(tmp_path / "again")]) == 0
  assert_same_tensors(flex, str(tmp_path / "again"))
  # The fused layout reads to the same model.
  fuse(flex, str(tmp_path / "fused"), 4, 3)
  importer.import_hf(str(tmp_path / "fused"), str(tmp_path / "imported_fused"),
                     vocabulary="byte", progress=lambda _: None)
  export.export_hf(str(tmp_path / "imported_fused"), str(tmp_path / "again_fused"),
                   progress=lambda _: None)
  assert_same_tensors(flex, str(tmp_path / "again_fused"))
  # Dense OLMo-2, through a sharded export and back.
  olmo = hf_checkpoint("olmo2", str(tmp_path / "olmo"))
  public = importer.import_hf(olmo, str(tmp_path / "public"), vocabulary="byte",
                              progress=lambda _: None)
  assert store.read_manifest(public, "public")["fingerprint"] == store.fingerprint(
      ours(public)[1])
  export.export_hf(public, str(tmp_path / "sharded"), shard_size="200KB", progress=lambda _: None)
  importer.import_hf(str(tmp_path / "sharded"), str(tmp_path / "public2"),
                     progress=lambda _: None)    # vocabulary from the ByT5 tokenizer files
  export.export_hf(str(tmp_path / "public2"), str(tmp_path / "again_olmo"),
                   progress=lambda _: None)
  assert_same_tensors(olmo, str(tmp_path / "again_olmo"))


@pytest.mark.slow
def test_a_released_flexolmo_model_is_extended_with_a_new_expert(tmp_path):
  """import-hf --split, train-expert against the imported public model, merge into the import."""
  from flexolmo_jax.train import loop
  from flexolmo_jax.flexolmo import expert

  flex = hf_checkpoint("flex_olmo", str(tmp_path / "flex"))
  importer.import_hf(flex, str(tmp_path / "release"), split=True, vocabulary="byte",
                     progress=lambda _: None)
  text = tmp_path / "owner.txt"
  with open(os.path.join(sysconfig.get_paths()["stdlib"], "shlex.py"), encoding="utf-8") as fh:
    text.write_text(fh.read())
  _, artifact = expert.train_expert(
      public=str(tmp_path / "release" / "public"), name="shell", data=[str(text)],
      output_dir=str(tmp_path / "shell"),
      train=loop.TrainConfig(steps=4, batch_size=8, seq_len=64, warmup_steps=1, log_every=2,
                             checkpoint_every=4, async_checkpoints=False, peak_tflops=1.0),
      expert=expert.ExpertConfig(router_init="per_layer"))
  released = str(tmp_path / "release" / "merged")
  extended = merge.merge(released, [artifact], str(tmp_path / "extended"), top_k=2,
                         progress=lambda _: None)
  cfg, params = merged_model.load_merged(extended)
  assert cfg.experts == ("public", "expert_1", "expert_2", "expert_3", "shell")
  # The released experts are untouched; opting the new one out gives the released model back.
  old_cfg, old = merged_model.load_merged(released)
  _, without = merged_model.load_merged(extended, exclude="shell")
  # (the new expert brings a negative bias; the released experts' are zero)
  np.testing.assert_array_equal(without["blocks"]["ffn"].pop("negative_bias"), 0.0)
  jax.tree.map(np.testing.assert_array_equal, without, old)
  without["blocks"]["ffn"]["negative_bias"] = np.zeros((old_cfg.n_layers, 4), np.float32)
  toks = np.random.RandomState(3).randint(3, 259, (1, 16))
  np.testing.assert_array_equal(np.asarray(pure_model(old_cfg)(old, toks)[0]),
                                np.asarray(pure_model(cfg.with_experts(old_cfg.experts))(
                                    without, toks)[0]))
  # An expert trained against another public router row is refused, naming it.
  other = expert.train_expert(
      public=str(tmp_path / "release" / "public"), name="shell2", data=[str(text)],
      output_dir=str(tmp_path / "shell2"),
      train=loop.TrainConfig(steps=2, batch_size=8, seq_len=64, warmup_steps=1, log_every=2,
                             checkpoint_every=2, async_checkpoints=False, peak_tflops=1.0),
      expert=expert.ExpertConfig(router_init="random"))[1]
  with pytest.raises(ValueError, match="expert 'shell2' .* different public router row"):
    merge.merge(released, [other], str(tmp_path / "bad"), progress=lambda _: None)
