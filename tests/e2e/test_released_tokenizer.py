"""Extending a release that brings its own tokenizer: a transformers OLMo-2 (dense) or FlexOlmo
with a byte-level BPE tokenizer.json -> import-hf (the vocabulary from its files) -> train-expert on
text tokenized by it -> merge -> export-hf -> transformers gives our logits and greedy tokens, and
the tokenizer files come back unchanged."""
import json
import os
import shutil
import sysconfig

import jax
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from flexolmo_jax.checkpoint import merged_model, store
from flexolmo_jax.convert import export, importer
from flexolmo_jax.data import vocabularies
from flexolmo_jax.eval import generate
from flexolmo_jax.flexolmo import expert, merge
from flexolmo_jax.model.transformer import pure_model
from flexolmo_jax.train import loop
from tests.e2e.fixtures import OLMO2_TOKENIZER_USERS
from tests.helpers import hf_logits, hf_reference
from tests.test_hf_convert import load_hf
from tests.bpe import write_bpe
from tests.test_vocabularies import TEXTS

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def release(kind, out, tokenizer=None):
  """A random transformers model saved with a BPE tokenizer: a 1000-entry one trained here, or
  ``tokenizer`` (a tokenizer.json whose files are copied). Its embedding is padded to a multiple
  of 128 rows, its config's special ids are the tokenizer's."""
  if tokenizer is None:
    tokenizer = write_bpe(str(out), vocab_size=1000)
  else:
    os.makedirs(out)
    for name in TOKENIZER_FILES:
      shutil.copy(os.path.join(os.path.dirname(tokenizer), name), out)
    tokenizer = os.path.join(out, "tokenizer.json")
  vocab = vocabularies.load(tokenizer)
  ref, _, _ = hf_reference(kind, vocab_size=-(-vocab.vocab_size // 128) * 128,
                           eos_token_id=vocab.eos_id, pad_token_id=vocab.tokenizer_pad_id,
                           bos_token_id=vocab.bos_id)
  ref.save_pretrained(str(out))
  return str(out), vocab


# Both flows run with a 1000-entry tokenizer and with one at OLMo-2's size (100,278 ids, its
# specials and pre-tokenizer pattern: tests/bpe.py).
SIZES = ["1k", pytest.param("100k", marks=OLMO2_TOKENIZER_USERS)]


@pytest.fixture(params=SIZES)
def tokenizer(request):
  """None (a 1000-entry tokenizer trained with the release) or the OLMo-2-sized tokenizer.json."""
  return request.getfixturevalue("olmo2_tokenizer") if request.param == "100k" else None


def owner_text(path):
  with open(os.path.join(sysconfig.get_paths()["stdlib"], "shlex.py"), encoding="utf-8") as fh:
    path.write_text(fh.read())
  return str(path)


def train_owner(public, tmp_path, router_init="per_layer"):
  return expert.train_expert(
      public=public, name="shell", data=[owner_text(tmp_path / "owner.txt")],
      output_dir=str(tmp_path / "shell"),
      train=loop.TrainConfig(steps=4, batch_size=8, seq_len=64, warmup_steps=1, log_every=2,
                             checkpoint_every=4, async_checkpoints=False, peak_tflops=1.0),
      expert=expert.ExpertConfig(router_init=router_init))[1]


def without_bias(params):
  """What export-hf --drop-negative-bias exports (the Hugging Face router has no bias)."""
  ffn = params["blocks"]["ffn"]
  if "negative_bias" in ffn:
    ffn["negative_bias"] = np.zeros_like(ffn["negative_bias"])


def assert_transformers_agree(hf_dir, source_dir, cfg, params, vocab):
  """The export loads with no missing keys, keeps the tokenizer's files, and gives our logits
  and greedy tokens on text its own AutoTokenizer encodes."""
  for name in TOKENIZER_FILES:
    with open(os.path.join(hf_dir, name), "rb") as a, open(os.path.join(source_dir, name),
                                                           "rb") as b:
      assert a.read() == b.read(), name
  ids = AutoTokenizer.from_pretrained(hf_dir).encode(TEXTS["code"] + TEXTS["prose"],
                                                     add_special_tokens=False)
  assert ids == vocab.encode(TEXTS["code"] + TEXTS["prose"])
  ref = load_hf(hf_dir)
  logits, _ = jax.jit(lambda p, t: pure_model(cfg)(p, t))(params, np.array([ids]))
  np.testing.assert_allclose(np.asarray(logits), hf_logits(ref, [ids]), atol=1e-4, rtol=0)
  prompt = ids[:8]
  theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                        eos_token_id=vocab.eos_id, pad_token_id=vocab.tokenizer_pad_id)
  mine = generate.generate(cfg, params, [prompt], 24, eos_id=vocab.eos_id)[0]
  assert generate.trim(mine, 8, eos_id=vocab.eos_id) == theirs[0].tolist()


@pytest.mark.slow
def test_a_dense_olmo2_release_gets_an_expert_with_its_own_tokenizer(tmp_path, tokenizer):
  hf_dir, vocab = release("olmo2", tmp_path / "olmo2", tokenizer)
  public = importer.import_hf(hf_dir, str(tmp_path / "public"), progress=lambda _: None)
  assert store.read_manifest(public, "public")["vocabulary"]["kind"] == "tokenizer"
  artifact = train_owner(public, tmp_path, router_init="random")   # no public data to embed
  card = store.read_manifest(artifact, "expert")
  assert card["vocabulary"] == store.read_manifest(public, "public")["vocabulary"]
  merged = merge.merge(public, [artifact], str(tmp_path / "merged"), top_k=2,
                       progress=lambda _: None)
  out = export.export_hf(merged, str(tmp_path / "hf"), drop_negative_bias=True,
                         progress=lambda _: None)
  cfg, params = merged_model.load_merged(merged)
  without_bias(params)
  assert_transformers_agree(out, hf_dir, cfg, params, vocab)


@pytest.mark.slow
def test_a_flexolmo_release_with_its_tokenizer_is_extended_leaving_its_experts_untouched(
    tmp_path, tokenizer):
  hf_dir, vocab = release("flex_olmo", tmp_path / "flex", tokenizer)
  importer.import_hf(hf_dir, str(tmp_path / "release"), split=True, progress=lambda _: None)
  released = str(tmp_path / "release" / "merged")
  artifact = train_owner(str(tmp_path / "release" / "public"), tmp_path)
  extended = merge.merge(released, [artifact], str(tmp_path / "extended"), top_k=2,
                         progress=lambda _: None)
  cfg, params = merged_model.load_merged(extended)
  assert cfg.experts == ("public", "expert_1", "expert_2", "expert_3", "shell")
  _, old = merged_model.load_merged(released)
  _, without = merged_model.load_merged(extended, exclude="shell")
  np.testing.assert_array_equal(without["blocks"]["ffn"].pop("negative_bias"), 0.0)
  jax.tree.map(np.testing.assert_array_equal, without, old)     # released experts bit-identical
  out = export.export_hf(extended, str(tmp_path / "hf"), drop_negative_bias=True,
                         progress=lambda _: None)
  without_bias(params)
  assert_transformers_agree(out, hf_dir, cfg, params, vocab)


@pytest.mark.slow
def test_pretrain_eval_and_generate_with_a_tokenizer_json(tmp_path, capsys):
  """The commands a user types with `--vocabulary tokenizer.json`: the public model keeps the
  tokenizer's files and records its identity; eval and generate read it back."""
  from flexolmo_jax import cli

  bpe = write_bpe(str(tmp_path / "tok"), vocab_size=1000)
  vocab = vocabularies.load(bpe)
  data = owner_text(tmp_path / "public.txt")
  run = str(tmp_path / "run")
  assert cli.main(["pretrain", "--model", "tiny", "--data", data, "--out", run,
                   "--vocabulary", bpe, "--steps", "3", "--batch-size", "8", "--seq-len", "64",
                   "--warmup", "1", "--gin.flexolmo.ModelConfig.vocab_size=1024",
                   "--gin.flexolmo.TrainConfig.peak_tflops=1.0"]) == 0
  model = os.path.join(run, "model")
  manifest = store.read_manifest(model, "public")
  assert manifest["vocabulary"] == {"spec": "tokenizer.json", **vocabularies.identity(bpe)}
  for name in TOKENIZER_FILES:
    with open(os.path.join(model, name), "rb") as a, open(os.path.join(tmp_path / "tok", name),
                                                          "rb") as b:
      assert a.read() == b.read(), name
  capsys.readouterr()
  with open(data) as fh:     # one document per three lines: some are validation documents
    lines = fh.read().splitlines()
  docs = tmp_path / "docs.jsonl"
  docs.write_text("".join(json.dumps({"text": "\n".join(lines[i:i + 3])}) + "\n"
                          for i in range(0, len(lines), 3)))
  assert cli.main(["eval", "--model", run, "--data", f"code={docs}", "--seq-len", "64"]) == 0
  assert "code" in capsys.readouterr().out
  assert cli.main(["generate", "--model", run, "--prompt", "def main(",
                   "--max-new-tokens", "8"]) == 0
  out = capsys.readouterr().out
  assert "def main(" in out and vocab.vocab_size == 1000
