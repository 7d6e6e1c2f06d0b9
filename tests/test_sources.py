"""Local corpora -> TFDS datasets: real text, stable splits, clear errors, nothing half-written."""
import json
import logging
import os
import shutil
import tempfile

import pytest

from flexolmo_jax.data import sources
from flexolmo_jax.data.sources import DataError, SourceSpec

STDLIB_JSON = os.path.dirname(json.__file__)   # real Python source on every machine


def load_split(builder, split):
  import tensorflow_datasets as tfds
  ds = builder.as_dataset(split=split)
  return sorted(ex["text"].decode("utf-8") for ex in tfds.as_numpy(ds))


def copy_stdlib(dst, names):
  os.makedirs(dst, exist_ok=True)
  for n in names:
    shutil.copy(os.path.join(STDLIB_JSON, n), os.path.join(dst, n))


def test_directory_of_python_files_round_trips(tmp_path):
  spec = SourceSpec(paths=(STDLIB_JSON,), pattern="*.py", validation_fraction=0.3)
  builder, stats = sources.prepare("stdlib_json", spec, str(tmp_path / "tfds"))
  files = sorted(p for p in os.listdir(STDLIB_JSON) if p.endswith(".py"))
  texts = {}
  for f in files:
    with open(os.path.join(STDLIB_JSON, f), encoding="utf-8") as fh:
      texts[f] = fh.read()
  expected = {s: sorted(t for t in texts.values() if t and sources.split_of(t, 0.3) == s)
              for s in ("train", "validation")}
  for split in ("train", "validation"):
    if expected[split]:
      assert load_split(builder, split) == expected[split]
  assert stats.documents["train"] + stats.documents["validation"] == sum(1 for t in texts.values()
                                                                         if t)
  assert stats.empty_skipped == sum(1 for t in texts.values() if not t)
  # Reuse: a second prepare finds the complete dataset and does not rebuild it.
  mtime = os.path.getmtime(os.path.join(builder.data_dir, "dataset_info.json"))
  builder2, _ = sources.prepare("stdlib_json", spec, str(tmp_path / "tfds"))
  assert os.path.getmtime(os.path.join(builder2.data_dir, "dataset_info.json")) == mtime


def test_split_of_a_document_never_changes_when_files_are_added(tmp_path):
  copy_stdlib(tmp_path / "a", ["decoder.py", "encoder.py", "scanner.py"])
  spec_a = SourceSpec(paths=(str(tmp_path / "a"),), validation_fraction=0.5)
  b1, _ = sources.prepare("dom_a", spec_a, str(tmp_path / "tfds"))
  copy_stdlib(tmp_path / "a", ["tool.py", "__init__.py"])
  b2, _ = sources.prepare("dom_b", spec_a, str(tmp_path / "tfds"))
  for split in ("train", "validation"):
    before = set(load_split(b1, split)) if b1.info.splits.get(split) else set()
    after = set(load_split(b2, split)) if b2.info.splits.get(split) else set()
    assert before <= after
  # And the hash split is a pure function of the text.
  assert {sources.split_of(f"doc {i}", 0.5) for i in range(50)} == {"train", "validation"}


def test_jsonl_with_field(tmp_path):
  p = tmp_path / "owner.jsonl"
  rows = [{"body": "first doc é"}, {"body": ""}, {"body": "third \u4e2d\u6587"}]
  p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
  stats = sources.scan(SourceSpec(paths=(str(p),), field="body"))
  assert sum(stats.documents.values()) == 2 and stats.empty_skipped == 1
  docs = [d.text for d in sources.iter_documents(SourceSpec(paths=(str(p),), field="body"))]
  assert docs == ["first doc é", "third \u4e2d\u6587"]


@pytest.mark.parametrize("content,match", [
    ('{"text": "ok"}\n{"text": \n', r"owner\.jsonl:2: not valid JSON"),
    ('{"text": "ok"}\n{"body": "x"}\n', r"owner\.jsonl:2: no field 'text'"),
    ('{"text": 3}\n', r"owner\.jsonl:1: field 'text' is int"),
])
def test_bad_jsonl_names_file_and_line_and_writes_nothing(tmp_path, content, match):
  p = tmp_path / "owner.jsonl"
  p.write_text(content)
  with pytest.raises(DataError, match=match):
    sources.prepare("owner", SourceSpec(paths=(str(p),)), str(tmp_path / "tfds"))
  assert not (tmp_path / "tfds").exists()


def test_missing_path_and_empty_directory(tmp_path):
  with pytest.raises(DataError, match=r"nope: no such file or directory"):
    sources.scan(SourceSpec(paths=(str(tmp_path / "nope"),)))
  (tmp_path / "empty").mkdir()
  with pytest.raises(DataError, match=r"empty: the directory has no files matching"):
    sources.scan(SourceSpec(paths=(str(tmp_path / "empty"),)))
  (tmp_path / "blank.txt").write_text("")
  with pytest.raises(DataError, match=r"No non-empty documents.*1 empty"):
    sources.scan(SourceSpec(paths=(str(tmp_path / "blank.txt"),)))


def test_invalid_utf8_replaced_and_counted_or_refused(tmp_path, caplog):
  p = tmp_path / "latin1.txt"
  p.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
  with caplog.at_level(logging.WARNING):
    stats = sources.scan(SourceSpec(paths=(str(p),)))
  assert stats.invalid_utf8_replaced == 1
  assert "not valid UTF-8" in caplog.text
  assert next(sources.iter_documents(SourceSpec(paths=(str(p),)))).text == "caf\ufffd cr\ufffdme"
  with pytest.raises(DataError, match=r"latin1\.txt: not valid UTF-8 \(byte 3\)"):
    sources.scan(SourceSpec(paths=(str(p),), invalid_utf8="error"))


def test_interrupted_preparation_never_looks_complete(tmp_path, monkeypatch):
  copy_stdlib(tmp_path / "src", ["decoder.py", "encoder.py", "scanner.py", "tool.py"])
  spec = SourceSpec(paths=(str(tmp_path / "src"),), validation_fraction=0.0)
  real = sources._split_examples

  def crashing(spec, split):
    for i, ex in enumerate(real(spec, split)):
      if i == 2:
        raise KeyboardInterrupt("killed mid-write")
      yield ex

  monkeypatch.setattr(sources, "_split_examples", crashing)
  with pytest.raises(KeyboardInterrupt):
    sources.prepare("owner", spec, str(tmp_path / "tfds"))
  assert not sources.is_prepared(str(tmp_path / "tfds" / "owner" / "1.0.0"))
  monkeypatch.setattr(sources, "_split_examples", real)
  builder, stats = sources.prepare("owner", spec, str(tmp_path / "tfds"))
  assert len(load_split(builder, "train")) == stats.documents["train"] == 4


def test_changed_data_under_the_same_name_is_refused(tmp_path):
  copy_stdlib(tmp_path / "src", ["decoder.py", "encoder.py"])
  spec = SourceSpec(paths=(str(tmp_path / "src"),))
  sources.prepare("owner", spec, str(tmp_path / "tfds"))
  copy_stdlib(tmp_path / "src", ["tool.py"])
  with pytest.raises(DataError, match="prepared from other inputs"):
    sources.prepare("owner", spec, str(tmp_path / "tfds"))
  _, stats = sources.prepare("owner", spec, str(tmp_path / "tfds"), overwrite=True)
  assert sum(stats.documents.values()) == 3


def test_preparing_leaves_nothing_in_the_temporary_directory(tmp_path, monkeypatch):
  """TFDS makes a temporary directory whenever it sets up a builder for a dataset not prepared
  yet, and keeps it: a preparation must not leave it behind (one per training run, in /tmp)."""
  tmp = tmp_path / "tmp"
  tmp.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(tmp))
  copy_stdlib(tmp_path / "src", ["decoder.py", "encoder.py"])
  sources.prepare("owner", SourceSpec(paths=(str(tmp_path / "src"),)), str(tmp_path / "tfds"))
  assert tempfile.gettempdir() == str(tmp) and os.listdir(tmp) == []
  assert not [p for p in os.listdir(tmp_path / "tfds") if p.startswith(".")]   # nor scratch


def test_cli_prepare_and_inspect(tmp_path, capsys):
  from flexolmo_jax import cli
  data_dir = str(tmp_path / "tfds")
  assert cli.main(["data", "prepare", "--name", "stdjson", "--path", STDLIB_JSON, "--pattern",
                   "*.py", "--data-dir", data_dir, "--validation-fraction", "0"]) == 0
  assert "stdjson: 5 train / 0 validation documents" in capsys.readouterr().out
  assert cli.main(["data", "inspect", "stdjson", "--data-dir", data_dir, "--examples", "1"]) == 0
  assert "train: 5 documents" in capsys.readouterr().out
  assert cli.main(["data", "prepare", "--name", "x", "--path", str(tmp_path / "missing"),
                   "--data-dir", data_dir]) == 2
  assert "missing: no such file or directory" in capsys.readouterr().err
