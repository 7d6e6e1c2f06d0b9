"""A Hugging Face tokenizer.json as a seqio vocabulary: the ids of transformers' AutoTokenizer,
in Python and inside the tf.data pipeline, its identity in manifests, and its files kept."""
import json
import os
import pickle

import pytest

from flexolmo_jax.data import tasks, vocabularies
from tests.bpe import EOS, write_bpe

TEXTS = {
    "code": "def area(r):\n    return 3.14159 * r ** 2  # circle\n\n\tprint(area(2))\n",
    "prose": "The owners train their experts alone; nobody's data leaves its house. It's fine!",
    "non_ascii": "Grüße aus Zürich — 東京で会いましょう 🙂 naïve façade ÅÆØ ΔΣΩ",
    "special": f"one document{EOS}another",
}


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
  return write_bpe(str(tmp_path_factory.mktemp("bpe")))


def test_ids_equal_autotokenizers_on_code_prose_and_non_ascii(bpe):
  from transformers import AutoTokenizer

  ours = vocabularies.load(bpe)
  theirs = AutoTokenizer.from_pretrained(os.path.dirname(bpe))
  assert ours.vocab_size == len(theirs) and 900 <= ours.vocab_size <= 1000
  assert (ours.eos_id, ours.tokenizer_pad_id, ours.bos_id) == (
      theirs.eos_token_id, theirs.pad_token_id, theirs.bos_token_id)
  for name, text in TEXTS.items():
    ids = ours.encode(text)
    assert ids == theirs.encode(text, add_special_tokens=False), name
    if name == "special":    # seqio's decode stops at the first EOS, as for every vocabulary
      assert ours.decode(ids) == "one document"
    else:                    # byte-level BPE is lossless
      assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True) == text, name
  assert ours.encode_batch(list(TEXTS.values())) == [ours.encode(t) for t in TEXTS.values()]


def test_tensorflow_encoding_and_the_packed_stream_use_the_same_ids(bpe, tmp_path):
  import tensorflow as tf

  from flexolmo_jax.data import sources

  vocab = vocabularies.load(bpe)
  # Id 0 is a real token here ("!", as in OLMo-2's), which seqio's packing would take for
  # padding: TensorFlow carries it as a stand-in id.
  assert vocab.encode("!") == [0] and vocab.zero_stand_in == vocab.vocab_size
  for text in TEXTS.values():
    want = [vocab.zero_stand_in if i == 0 else i for i in vocab.encode(text)]
    assert vocab.encode_tf(tf.constant(text)).numpy().tolist() == want
  ids = vocab.encode(TEXTS["prose"])
  assert vocab.decode_tf(tf.constant([ids, ids])).numpy().tolist() == [
      TEXTS["prose"].encode()] * 2
  # The training stream: each document's tokens, then EOS, packed; a document holding id 0 is
  # neither cut short nor masked.
  docs = [TEXTS["code"], TEXTS["non_ascii"], TEXTS["prose"]]
  raw = tmp_path / "docs.jsonl"
  raw.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
  spec = sources.SourceSpec(paths=(str(raw),), validation_fraction=0.0)
  dataset_dir = sources.prepare("bpe_docs", spec, str(tmp_path / "data"))[0].data_dir
  tasks.register_domain_task("bpe_docs", dataset_dir, vocab)
  batch = next(tasks.lm_batches("bpe_docs", seq_len=256, batch_size=1, shuffle=False,
                                num_epochs=1, drop_remainder=False))
  segments = batch["decoder_segment_ids"][0]
  got = sorted(batch["decoder_target_tokens"][0][segments == s].tolist()
               for s in set(segments.tolist()) - {0})
  assert got == sorted(vocab.encode(d) + [vocab.eos_id] for d in docs)
  assert batch["decoder_loss_weights"][0].sum() == sum(len(vocab.encode(d)) + 1 for d in docs)


def test_identity_names_the_file_and_its_special_tokens(bpe, tmp_path):
  record = vocabularies.identity(bpe)
  vocab = vocabularies.load(bpe)
  assert record["kind"] == "tokenizer" and record["size"] == vocab.vocab_size
  assert (record["eos"], record["pad"], record["bos"]) == (vocab.eos_id, vocab.tokenizer_pad_id,
                                                           vocab.bos_id)
  assert record == vocabularies.identity(bpe)
  other = write_bpe(str(tmp_path / "other"), vocab_size=600)
  assert vocabularies.identity(other)["sha256"] != record["sha256"]
  assert vocabularies.load(other) != vocab and vocabularies.load(bpe) == vocab
  # Kept beside a saved model under fixed names, config included.
  spec, files = vocabularies.saved_files(bpe)
  assert spec == "tokenizer.json"
  assert files == {"tokenizer.json": bpe,
                   "tokenizer_config.json": os.path.join(os.path.dirname(bpe),
                                                         "tokenizer_config.json")}
  # Pickled (tf.data and multiprocessing copy vocabularies), it is the same vocabulary.
  assert pickle.loads(pickle.dumps(vocab)) == vocab
  assert "tokenizer (" in vocabularies.describe(record)


def test_bad_tokenizers_are_refused_naming_the_file(tmp_path):
  no_eos = write_bpe(str(tmp_path / "no_eos"), config={"tokenizer_class": "X"})
  with pytest.raises(ValueError, match=f"{no_eos}: no eos_token"):
    vocabularies.load(no_eos)
  unknown = write_bpe(str(tmp_path / "unknown"), config={"eos_token": "<|nowhere|>"})
  with pytest.raises(ValueError, match="eos token '<\\|nowhere\\|>' .* not in the vocabulary"):
    vocabularies.load(unknown)
  broken = tmp_path / "broken" / "tokenizer.json"
  broken.parent.mkdir()
  broken.write_text('{"model": ')
  with pytest.raises(ValueError, match=f"{broken}: not a tokenizer.json"):
    vocabularies.load(str(broken))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    vocabularies.load(str(tmp_path / "absent" / "tokenizer.json"))
  huge = tmp_path / "huge" / "tokenizer.json"
  huge.parent.mkdir()
  with open(huge, "wb") as fh:
    fh.truncate(vocabularies.MAX_TOKENIZER_BYTES + 1)      # sparse: nothing is written
  with pytest.raises(ValueError, match="above the .*-byte limit"):
    vocabularies.load(str(huge))
