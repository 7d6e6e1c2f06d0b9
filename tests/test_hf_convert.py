"""export-hf / import-hf against transformers on CPU (tiny random models built here, no hub)."""
import json
import os
import shutil
import sysconfig

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from flexolmo_jax import cli
from flexolmo_jax.checkpoint import merged_model, store
from flexolmo_jax.convert import export, importer
from flexolmo_jax.convert.safetensors_io import INDEX, SINGLE, TensorReader
from flexolmo_jax.data import tasks
from flexolmo_jax.eval import generate
from flexolmo_jax.flexolmo import merge
from flexolmo_jax.model.transformer import Transformer, pure_model
from tests.helpers import hf_logits, hf_reference, spread_router, tiny

BYTE = {"spec": "byte", **tasks.vocabulary_identity("byte")}
EXPERTS = ("public", "code", "math", "news")


def random_merged(out, negative_bias=False, seed=0, **changes):
  """A merged checkpoint of a random 4-expert top-2 model; its parts (public model) kept."""
  cfg = tiny(experts=EXPERTS, top_k=2, negative_bias=negative_bias, top_k_policy="clamp",
             **changes)
  model = spread_router(Transformer(cfg, nnx.Rngs(seed)), seed=seed)
  params = jax.tree.map(np.asarray, nnx.state(model, nnx.Param).to_pure_dict())
  if negative_bias:
    params["blocks"]["ffn"]["negative_bias"] = np.random.RandomState(seed).uniform(
        -2, 0, params["blocks"]["ffn"]["negative_bias"].shape).astype(np.float32)
    params["blocks"]["ffn"]["negative_bias"][:, 0] = 0.0
  path = merge.save_moe(str(out / "merged"), cfg, params, vocabulary=BYTE,
                        parts=str(out / "parts"), progress=lambda _: None)
  return path, str(out / "parts" / "public")


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
  return random_merged(tmp_path_factory.mktemp("random"))


def load_hf(path):
  from transformers import AutoModelForCausalLM

  model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True,
                                                     dtype=torch.float32)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert not info.get("mismatched_keys"), info
  return model.eval()


def ours(path, **select):
  if store.read_manifest(path)["kind"] == "merged":
    return merged_model.load_merged(path, **select)
  cfg = store.config_from_json(store.read_manifest(path)["config"], path)
  return cfg, store.load_params(path, pure_model(cfg).abstract.to_pure_dict())


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


def test_negative_bias_is_refused_unless_dropped(tmp_path):
  path, _ = random_merged(tmp_path, negative_bias=True)
  with pytest.raises(ValueError, match=r"Experts \['code', 'math', 'news'\] .* negative router "
                                       r"bias.*--drop-negative-bias"):
    export.export_hf(path, str(tmp_path / "hf"), progress=lambda _: None)
  assert not os.path.exists(tmp_path / "hf")
  out = export.export_hf(path, str(tmp_path / "hf"), drop_negative_bias=True,
                         progress=lambda _: None)
  cfg, params = ours(path)
  params["blocks"]["ffn"].pop("negative_bias")
  ref = load_hf(out)
  toks = np.random.RandomState(2).randint(3, 259, (2, 24))
  logits, _ = pure_model(cfg.replace(negative_bias=False))(params, toks)
  np.testing.assert_allclose(np.asarray(logits), hf_logits(ref, toks), atol=1e-4, rtol=0)


def test_byte_tokenizer_matches_the_seqio_vocabulary(merged, tmp_path):
  from transformers import AutoTokenizer, ByT5Tokenizer

  out = export.export_hf(merged[1], str(tmp_path / "hf"), progress=lambda _: None)
  tok = AutoTokenizer.from_pretrained(out)
  byt5 = ByT5Tokenizer.from_pretrained(out)
  vocab = tasks.vocabulary_from_spec("byte")
  stdlib = sysconfig.get_paths()["stdlib"]
  for name in ("re/_casefix.py", "shlex.py"):
    with open(os.path.join(stdlib, name), encoding="utf-8") as fh:
      text = fh.read()
    assert any(ord(c) > 127 for c in text)
    ids = list(vocab.encode(text))
    assert tok.encode(text) == ids
    assert byt5.encode(text, add_special_tokens=False) == ids
    assert tok.decode(ids) == byt5.decode(ids) == text == vocab.decode(ids)
  for t in (tok, byt5):
    assert (t.pad_token_id, t.eos_token_id, t.unk_token_id) == (0, 1, 2)


def hf_checkpoint(kind, out, **overrides):
  ref, _, _ = hf_reference(kind, vocab_size=512, **overrides)
  ref.save_pretrained(out)
  return out


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


def test_split_import_names_the_experts_and_keeps_the_parts(tmp_path):
  flex = hf_checkpoint("flex_olmo", str(tmp_path / "flex"))
  importer.import_hf(flex, str(tmp_path / "out"), names=["math", "code", "news"], split=True,
                     vocabulary="byte", progress=lambda _: None)
  merged = store.read_manifest(str(tmp_path / "out" / "merged"), "merged")
  assert merged["experts"] == ["public", "code", "math", "news"]
  public = store.read_manifest(str(tmp_path / "out" / "public"), "public")
  for name in ("code", "math", "news"):
    artifact = store.read_manifest(str(tmp_path / "out" / "experts" / name), "expert")
    assert artifact["anchor_fingerprint"] == public["fingerprint"]
  # HF expert 1 was named math: its weights are the merged model's "math" expert.
  cfg, params = merged_model.load_merged(str(tmp_path / "out" / "merged"))
  sd = load_file(os.path.join(flex, SINGLE))
  np.testing.assert_array_equal(params["blocks"]["ffn"]["w_up"][0, cfg.experts.index("math")],
                                sd["model.layers.0.mlp.experts.1.up_proj.weight"].T)
  np.testing.assert_array_equal(params["blocks"]["ffn"]["router_embedding"][2],
                                sd["model.layers.2.mlp.gate.weight"][[0, 2, 1, 3]])


def test_clear_errors(tmp_path):
  def refuse(path, match, vocabulary="byte", **kw):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
      importer.import_hf(str(path), str(tmp_path / "out"), vocabulary=vocabulary,
                         progress=lambda _: None, **kw)
    assert not os.path.exists(tmp_path / "out")

  os.makedirs(tmp_path / "empty")
  refuse(tmp_path / "empty", "has no config.json")
  olmo = hf_checkpoint("olmo2", str(tmp_path / "olmo"))

  def edited(name, config=None, tensors=None):
    path = tmp_path / name
    shutil.copytree(olmo, path)
    if config:
      data = json.load(open(path / "config.json"))
      json.dump({**data, **config}, open(path / "config.json", "w"))
    if tensors:
      sd = load_file(str(path / SINGLE))
      tensors(sd)
      save_file(sd, str(path / SINGLE), metadata={"format": "pt"})
    return path

  refuse(edited("llama", config={"model_type": "llama"}), "model_type 'llama' is not supported")
  refuse(edited("missing", tensors=lambda sd: sd.pop("model.layers.1.self_attn.q_norm.weight")),
         r"missing tensors: model\.layers\.1\.self_attn\.q_norm\.weight")
  refuse(edited("extra", tensors=lambda sd: sd.update({"model.layers.0.mlp.bias":
                                                       np.zeros(3, np.float32)})),
         r"unexpected tensors: model\.layers\.0\.mlp\.bias")
  refuse(edited("shape", tensors=lambda sd: sd.update({"model.layers.0.self_attn.k_norm.weight":
                                                       np.ones(7, np.float32)})),
         r"model\.layers\.0\.self_attn\.k_norm\.weight: shape \(7,\), expected \(32,\)")
  refuse(edited("small_vocab", config={"vocab_size": 200},
                tensors=lambda sd: sd.update({k: sd[k][:200] for k in
                                              ("model.embed_tokens.weight", "lm_head.weight")})),
         "has 259 ids but the model's embedding has 200 rows")
  refuse(olmo, "cannot tell the vocabulary", vocabulary=None)
  refuse(hf_checkpoint("flex_olmo", str(tmp_path / "flex")), "give 3 names", names=["a"])
  # export: a model whose embedding is smaller than its vocabulary.
  path, _ = random_merged(tmp_path / "small", vocab_size=200)
  with pytest.raises(ValueError, match="259 ids but the model's embedding has 200 rows"):
    export.export_hf(path, str(tmp_path / "hf"), progress=lambda _: None)
  assert not any(p.startswith("hf") for p in os.listdir(tmp_path))


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


def test_bf16_export_loads_and_imports(merged, tmp_path):
  """bf16 tensors are the fp32 weights rounded to bf16 (as torch rounds them), and import reads
  them back exactly."""
  _, public = merged
  out = export.export_hf(public, str(tmp_path / "bf16"), dtype="bf16", progress=lambda _: None)
  assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"
  fp32 = export.export_hf(public, str(tmp_path / "fp32"), progress=lambda _: None)
  from safetensors import safe_open
  with safe_open(os.path.join(out, SINGLE), "pt") as bf, safe_open(os.path.join(fp32, SINGLE),
                                                                    "pt") as full:
    for name in full.keys():
      assert bf.get_tensor(name).dtype == torch.bfloat16
      assert torch.equal(bf.get_tensor(name), full.get_tensor(name).to(torch.bfloat16)), name
  back = importer.import_hf(out, str(tmp_path / "back"), progress=lambda _: None)
  reader = TensorReader(out)
  cfg, params = ours(back)
  np.testing.assert_array_equal(
      params["embed"], reader.get("model.embed_tokens.weight").astype(np.float32))
  ref = load_hf(out)
  assert ref.dtype == torch.float32          # loaded as asked; the weights are the bf16 values
