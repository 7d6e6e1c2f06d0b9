"""seqio Tasks from a directory of real Python source: shapes, content, determinism, shards, resume."""
import collections
import itertools
import json
import os

import numpy as np
import seqio
import pytest

from flexolmo_jax.data import sources, tasks, vocabularies

STDLIB_JSON = os.path.dirname(json.__file__)
SEQ, BATCH = 256, 4


@pytest.fixture(scope="module")
def task_name(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  spec = sources.SourceSpec(paths=(STDLIB_JSON,), pattern="*.py", validation_fraction=0.0)
  sources.prepare("stdlib_json_py", spec, data_dir)
  tasks.register_domain_task("stdlib_json_py", os.path.join(data_dir, "stdlib_json_py", "1.0.0"))
  return "stdlib_json_py"


def documents():
  docs = []
  for f in sorted(os.listdir(STDLIB_JSON)):
    if f.endswith(".py"):
      with open(os.path.join(STDLIB_JSON, f), "rb") as fh:
        data = fh.read()
      if data:
        docs.append(data)
  return docs


def chunks_of(batches):
  """Each packed segment's target bytes (EOS kept as b'<eos>')."""
  out = []
  for b in batches:
    for row in range(b["decoder_target_tokens"].shape[0]):
      seg, tgt = b["decoder_segment_ids"][row], b["decoder_target_tokens"][row]
      for s in sorted(set(seg.tolist()) - {0}):
        ids = tgt[seg == s].tolist()
        eos = ids and ids[-1] == 1
        body = bytes(i - 3 for i in (ids[:-1] if eos else ids))
        out.append(body + (b"<eos>" if eos else b""))
  return out


def stream(task, **kw):
  kw = {"seq_len": SEQ, "batch_size": BATCH, **kw}
  return list(tasks.lm_batches(task, **kw))


def test_packed_batches_reproduce_the_source_text(task_name):
  batches = stream(task_name, shuffle=False, num_epochs=1, drop_remainder=False)
  for b in batches:
    assert set(b) == {"decoder_target_tokens", "decoder_input_tokens", "decoder_loss_weights",
                      "decoder_segment_ids", "decoder_positions"}
    assert all(v.shape[1] == SEQ and v.shape[0] <= BATCH for v in b.values())
  assert all(b["decoder_target_tokens"].shape == (BATCH, SEQ) for b in batches[:-1])
  docs = documents()
  chunks = chunks_of(batches)
  # Every chunk is a piece of a real document, nothing is lost, one EOS ends each document.
  for c in chunks:
    assert any(c.removesuffix(b"<eos>") in d for d in docs)
  assert sum(c.endswith(b"<eos>") for c in chunks) == len(docs)
  assert sum(len(c.removesuffix(b"<eos>")) for c in chunks) == sum(len(d) for d in docs)


def test_short_documents_are_packed(tmp_path):
  """One JSONL document per source line: several share a row; positions restart per segment."""
  with open(os.path.join(STDLIB_JSON, "decoder.py"), encoding="utf-8") as fh:
    lines = [l for l in fh.read().splitlines() if l.strip()]
  path = tmp_path / "lines.jsonl"
  path.write_text("\n".join(json.dumps({"text": l}) for l in lines))
  spec = sources.SourceSpec(paths=(str(path),), validation_fraction=0.0)
  sources.prepare("json_lines", spec, str(tmp_path / "tfds"))
  tasks.register_domain_task("json_lines", str(tmp_path / "tfds" / "json_lines" / "1.0.0"))
  batches = stream("json_lines", shuffle=False, num_epochs=1, drop_remainder=False)
  chunks = chunks_of(batches)
  assert sorted(c.removesuffix(b"<eos>").decode() for c in chunks) == sorted(lines)
  rows = [(b["decoder_segment_ids"][i], b["decoder_positions"][i], b["decoder_loss_weights"][i])
          for b in batches for i in range(b["decoder_segment_ids"].shape[0])]
  assert sum(len(set(seg.tolist()) - {0}) for seg, _, _ in rows) == len(lines)
  assert len(rows) < len(lines) / 4          # packed: many lines per row
  for seg, pos, weights in rows:
    starts = np.flatnonzero(np.diff(seg) != 0) + 1
    assert all(pos[s] == 0 for s in starts if seg[s] != 0)
    np.testing.assert_array_equal(weights > 0, seg > 0)   # padding carries no loss


def test_same_seed_same_batches_and_resume(task_name):
  a = list(itertools.islice(tasks.lm_batches(task_name, seq_len=SEQ, batch_size=BATCH, seed=3), 8))
  b = list(itertools.islice(tasks.lm_batches(task_name, seq_len=SEQ, batch_size=BATCH, seed=3), 8))
  c = list(itertools.islice(tasks.lm_batches(task_name, seq_len=SEQ, batch_size=BATCH, seed=4), 8))
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert any(not np.array_equal(x["decoder_target_tokens"], y["decoder_target_tokens"])
             for x, y in zip(a, c))
  resumed = list(itertools.islice(
      tasks.lm_batches(task_name, seq_len=SEQ, batch_size=BATCH, seed=3, start_step=5), 3))
  for x, y in zip(a[5:], resumed):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_the_same_files_anywhere_give_the_same_batches(tmp_path):
  """Where the data sits (the workdir, the data dir) must not change the stream: two copies of
  one corpus, prepared in two places, give identical batches."""
  streams = []
  for where in ("a", "deeper/b"):
    copy = tmp_path / where / "corpus"
    copy.mkdir(parents=True)
    for f in sorted(os.listdir(STDLIB_JSON)):
      if f.endswith(".py"):
        (copy / f).write_bytes(open(os.path.join(STDLIB_JSON, f), "rb").read())
    task = tasks.register_corpus(f"copy_{where[-1]}", [str(copy)], data_dir=str(tmp_path / where))
    streams.append(list(itertools.islice(
        tasks.lm_batches(task, seq_len=64, batch_size=2, seed=0), 3)))
  for x, y in zip(*streams):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_a_prepared_datasets_name_directory_is_refused_naming_its_version(tmp_path):
  spec = sources.SourceSpec(paths=(STDLIB_JSON,), pattern="*.py")
  sources.prepare("stdlib_json_named", spec, str(tmp_path / "tfds"))
  name_dir = tmp_path / "tfds" / "stdlib_json_named"
  with pytest.raises(sources.DataError, match="1.0.0"):
    tasks.register_corpus("named", [str(name_dir)], data_dir=str(tmp_path / "other"))


def test_host_shards_are_disjoint_and_cover(task_name):
  kw = dict(shuffle=False, num_epochs=1, drop_remainder=False)
  whole = collections.Counter(chunks_of(stream(task_name, **kw)))
  host0 = collections.Counter(chunks_of(stream(task_name, shard_index=0, num_shards=2, **kw)))
  host1 = collections.Counter(chunks_of(stream(task_name, shard_index=1, num_shards=2, **kw)))
  assert host0 and host1
  assert not set(host0) & set(host1)
  assert host0 + host1 == whole


def test_unprepared_directory_is_refused(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a prepared dataset"):
    tasks.register_domain_task("nothing_here", str(tmp_path))


def test_mixture_rates_by_tokens(task_name, tmp_path):
  p = tmp_path / "small.jsonl"
  p.write_text('{"text": "tiny owner"}\n')
  sources.prepare("tiny_owner", sources.SourceSpec(paths=(str(p),), validation_fraction=0.0),
                  str(tmp_path / "tfds"))
  tasks.register_domain_task("tiny_owner", str(tmp_path / "tfds" / "tiny_owner" / "1.0.0"))
  mix = tasks.register_mixture("mix_by_tokens", [(task_name, "tokens"), ("tiny_owner", "tokens")])
  total = sum(len(d) + 1 for d in documents())
  assert mix.get_rate(seqio.get_mixture_or_task(task_name)) == total
  assert mix.get_rate(seqio.get_mixture_or_task("tiny_owner")) == len("tiny owner") + 1
  batch = next(tasks.lm_batches("mix_by_tokens", seq_len=SEQ, batch_size=BATCH, seed=0))
  assert batch["decoder_target_tokens"].shape == (BATCH, SEQ)


def test_sentencepiece_vocabulary_trained_locally(task_name, tmp_path):
  data_dir = os.path.dirname(os.path.dirname(tasks._TASK_DIRS[task_name]))
  vocab = vocabularies.train_sentencepiece(os.path.join(data_dir, task_name, "1.0.0"),
                                    str(tmp_path / "spm" / "public"), vocab_size=1000)
  assert vocab.vocab_size == 1000 and vocab.eos_id == 1 and vocab.pad_id == 0
  text = documents()[0].decode("utf-8")[:500] + " ünïcödé ✓"
  ids = vocab.encode(text)
  assert vocab.decode(ids) == text                  # byte fallback: lossless on any text
  assert len(ids) < len(text.encode("utf-8")) / 1.5   # and it compresses real source code
  tasks.register_domain_task("json_spm", tasks._TASK_DIRS[task_name], vocabulary=vocab)
  batch = next(tasks.lm_batches("json_spm", seq_len=64, batch_size=2, seed=0))
  assert batch["decoder_target_tokens"].max() < 1000


def test_owner_stream_sees_only_the_owners_paths(tmp_path):
  """Two owners share a data directory; each one's stream holds only its own documents."""
  code = tmp_path / "code_owner"
  code.mkdir()
  for f in ("decoder.py", "scanner.py"):
    (code / f).write_bytes(open(os.path.join(STDLIB_JSON, f), "rb").read())
  legal = tmp_path / "legal_owner.jsonl"
  marker = "CANARY-legal-owner-7f3a"
  legal.write_text("\n".join(json.dumps({"text": f"{marker} clause {i}: the licensee shall "
                                                 "keep this notice."}) for i in range(200)))
  data_dir = str(tmp_path / "tfds")
  legal_batches = list(itertools.islice(tasks.owner_batches(
      "legal", [str(legal)], data_dir=data_dir, seq_len=128, batch_size=4), 3))
  assert any(marker.encode() in c for c in chunks_of(legal_batches))
  code_docs = [(code / f).read_bytes() for f in ("decoder.py", "scanner.py")]
  code_batches = list(tasks.owner_batches("code", [str(code)], data_dir=data_dir, seq_len=128,
                                          batch_size=4, num_epochs=1))
  chunks = chunks_of(code_batches)
  assert chunks and all(any(c.removesuffix(b"<eos>") in d for d in code_docs) for c in chunks)
  assert not any(b"licensee" in c or b"CANARY" in c for c in chunks)
  seen, total = sum(len(c.removesuffix(b"<eos>")) for c in chunks), sum(len(d) for d in code_docs)
  assert total - 4 * 128 < seen <= total      # all of it, but the last partial batch


def test_byte_vocabulary_ids_equal_the_byt5_tokenizer():
  """The HF export will ship a ByT5 tokenizer: its ids must be the seqio byte vocabulary's."""
  from transformers import ByT5Tokenizer
  hf_tok = ByT5Tokenizer()
  vocab = vocabularies.load("byte")
  with open(os.path.join(STDLIB_JSON, "decoder.py"), encoding="utf-8") as fh:
    text = fh.read()[:2000] + " naïve café — ✓ 中文"
  ids = vocab.encode(text)
  assert hf_tok(text)["input_ids"] == ids + [vocab.eos_id]
  assert hf_tok.decode(ids) == vocab.decode(ids) == text
  assert (hf_tok.pad_token_id, hf_tok.eos_token_id, hf_tok.unk_token_id) == (0, 1, 2)
