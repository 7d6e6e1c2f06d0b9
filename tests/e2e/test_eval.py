"""The log-likelihood scorer, multiple-choice accuracy and per-domain statistics against naive
per-example computations."""
import json
import os
import numpy as np
import pytest
from flexolmo_jax.checkpoint import saved
from tests.e2e.fixtures import DEMO_READERS

pytestmark = DEMO_READERS


def test_eval_names_flexmix_domains_and_refuses_unknown_ones(flexmix, public, tmp_path, capsys):
  from flexolmo_jax import cli
  root = os.path.dirname(os.path.dirname(os.path.dirname(flexmix["code"])))   # .../flexmix_mini
  common = ["eval", "--model", public["model"], "--seq-len", "128", "--batch-size", "4",
            "--max-batches", "1"]
  for argv, message in (
      (["--flexmix", root, "--data", "news"], "--data news: unknown domain; the FlexMix-mini at "
                                              f"{root} has ['code', 'legal', 'math', 'prose', "
                                              "'public']"),
      (["--data", "code"], "--data code: write NAME=PATH, or give --flexmix DIR"),
      (["--flexmix", str(tmp_path), "--data", "code"], "no flexmix_mini.json there")):
    assert cli.main([*common, *argv]) == 2
    assert message in capsys.readouterr().err
  json_path = str(tmp_path / "out.json")
  assert cli.main([*common, "--flexmix", root, "--data", "code",
                   "--data", f"mine={flexmix['math']}", "--json", json_path]) == 0
  by_name = json.load(open(json_path))
  assert set(by_name) == {"code", "mine"}
  # The same numbers as naming the prepared dataset's path.
  assert cli.main([*common, "--data", f"code={flexmix['code']}", "--json", json_path]) == 0
  assert json.load(open(json_path))["code"] == by_name["code"]


@pytest.mark.slow
def test_extraction_cli_finds_the_canaries_among_an_owners_training_documents(demo_run,
                                                                              tmp_path, capsys):
  """`flexolmo extraction` on the legal owner's file: training documents with the planted
  canaries among them. The owner's dense model reproduces canaries and no ordinary document
  (3 or 4 of the 4 canaries in the quick demo's runs, ordinary documents at similarity about
  0.4); the numbers are those of extraction.extraction on the same documents; what cannot be
  tested is refused by name."""
  from flexolmo_jax import cli
  from flexolmo_jax.data import sources
  from flexolmo_jax.eval import extraction

  workdir = demo_run["workdir"]
  fm = os.path.join(workdir, "flexmix_mini")
  with open(demo_run["card"]["canaries"]["path"]) as fh:
    canaries = [json.loads(line)["text"] for line in fh]
  with open(os.path.join(fm, "raw", "legal.jsonl")) as fh:
    ordinary = [t for t in (json.loads(line)["text"] for line in fh)
                if t not in canaries and len(t.encode()) >= 200][:4]
  texts = ordinary[:2] + canaries + ordinary[2:] + ["too short to test"]
  docs = tmp_path / "owner.jsonl"
  docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
  dense = os.path.join(workdir, "dense", "legal", "model")
  out = str(tmp_path / "extraction.json")
  flags = ["--documents", str(docs), "--total", "128", "--min-length", "127", "--seed", "3"]
  assert cli.main(["extraction", "--model", dense, *flags, "--json", out]) == 0
  got = json.load(open(out))
  where = [row["document"] for row in got["per_document"]]
  assert where == [f"{docs}:{i}" for i in range(1, 9)]          # the short line is skipped
  similarity = {row["document"]: row["best_similarity"] for row in got["per_document"]}
  canary_lines = {f"{docs}:{i}" for i in range(3, 7)}
  extracted = {where for where, best in similarity.items() if best >= 0.9}
  assert extracted and extracted <= canary_lines             # canaries only, at least one
  assert got["extracted"] == len(extracted) and got["documents"] == 8
  assert got["rate"] == len(extracted) / 8
  printed = capsys.readouterr().out
  assert all(f"extracted: {where} " in printed for where in extracted)
  ordinary = set(similarity) - canary_lines
  assert (np.mean([similarity[w] for w in canary_lines])
          > np.mean([similarity[w] for w in ordinary]) + 0.2)
  # The oracle: the library call on the same token ids and settings.
  cfg, params, _ = saved.open_saved(dense)
  vocab = saved.vocabulary(dense)
  config = extraction.ExtractionConfig(total=128, min_length=127, seed=3)
  ids = [vocab.encode(t) for t in texts[:-1]]
  direct = extraction.extraction(cfg, params, ids, config, eos_id=vocab.eos_id)
  assert [row["best_similarity"] for row in got["per_document"]] == direct["per_document"]
  assert got["loss"] == extraction.document_loss(cfg, params, ids, 128)
  # The public model never saw the canaries: nothing extracted.
  assert cli.main(["extraction", "--model", os.path.join(workdir, "public"), *flags,
                   "--json", out]) == 0
  assert json.load(open(out))["extracted"] == 0
  # --split train keeps what `data prepare` trains on (every canary is in the train split).
  assert cli.main(["extraction", "--model", dense, *flags, "--split", "train",
                   "--validation-fraction", "0.5", "--json", out]) == 0
  kept = {row["document"] for row in json.load(open(out))["per_document"]}
  assert kept == {f"{docs}:{i + 1}" for i, t in enumerate(texts[:-1])
                  if sources.split_of(t, 0.5) == "train"} and len(kept) < 8
  capsys.readouterr()
  # Refusals name what is wrong.
  short = tmp_path / "short.jsonl"
  short.write_text(json.dumps({"text": "tiny"}) + "\n")
  for argv, message in (
      (["--documents", str(short)], f"{short}: none of the 1 documents read has --min-length 128"),
      (["--documents", str(docs), "--total", "512"], "--total 512 is longer than the model's "
                                                    "max_seq_len 256"),
      (["--documents", str(docs), "--prefix", "0"], "argument --prefix: 0 is below 1"),
      (["--documents", str(tmp_path / "missing.jsonl")], "missing.jsonl: no such file")):
    assert cli.main(["extraction", "--model", dense, *argv]) == 2
    assert message in capsys.readouterr().err
