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

from flexolmo_jax.checkpoint import merged_model, store
from flexolmo_jax.convert import export, importer
from flexolmo_jax.convert.safetensors_io import SINGLE, TensorReader
from flexolmo_jax.data import vocabularies
from flexolmo_jax.flexolmo import merge
from flexolmo_jax.model.transformer import Transformer, pure_model
from tests.helpers import hf_logits, hf_reference, spread_router, tiny

BYTE = {"spec": "byte", **vocabularies.identity("byte")}
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
  vocab = vocabularies.load("byte")
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


def test_a_tokenizer_json_is_imported_by_itself_and_exported_unchanged(tmp_path):
  """An OLMo-2 checkpoint with a byte-level BPE tokenizer.json: import-hf takes the vocabulary
  from it (no --vocabulary), keeps its files, and export-hf writes them back byte for byte; the
  exported model gives transformers' logits; another tokenizer is refused naming both."""
  from transformers import AutoTokenizer

  from flexolmo_jax.flexolmo import expert
  from flexolmo_jax.train import loop
  from tests.bpe import write_bpe
  from tests.test_vocabularies import TEXTS

  olmo = hf_checkpoint("olmo2", str(tmp_path / "olmo"))
  bpe = write_bpe(olmo, vocab_size=500)
  vocab = vocabularies.load(bpe)
  public = importer.import_hf(olmo, str(tmp_path / "public"), progress=lambda _: None)
  manifest = store.read_manifest(public, "public")
  assert manifest["vocabulary"] == {"spec": "tokenizer.json", **vocabularies.identity(bpe)}
  assert vocabularies.load(os.path.join(public, "tokenizer.json")) == vocab

  out = export.export_hf(public, str(tmp_path / "hf"), progress=lambda _: None)
  for name in ("tokenizer.json", "tokenizer_config.json"):
    with open(os.path.join(out, name), "rb") as a, open(os.path.join(olmo, name), "rb") as b:
      assert a.read() == b.read(), name
  with open(os.path.join(out, "generation_config.json")) as fh:
    generation = json.load(fh)
  assert (generation["eos_token_id"], generation["pad_token_id"]) == (vocab.eos_id,
                                                                       vocab.tokenizer_pad_id)
  ids = AutoTokenizer.from_pretrained(out).encode(TEXTS["code"], add_special_tokens=False)
  assert ids == vocab.encode(TEXTS["code"])
  cfg, params = ours(public)
  np.testing.assert_allclose(hf_logits(load_hf(out), [ids]),
                             np.asarray(pure_model(cfg)(params, np.array([ids]))[0]),
                             atol=1e-4, rtol=1e-4)

  other = write_bpe(str(tmp_path / "other"), vocab_size=400)
  with pytest.raises(ValueError, match=r"is tokenizer \(400 ids, sha256 \w+\), but the public "
                                       r"model .* was trained with tokenizer \(500 ids"):
    expert.check_public(public, "code", other, loop.TrainConfig(seq_len=64))
