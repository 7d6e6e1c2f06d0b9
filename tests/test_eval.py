"""The log-likelihood scorer, multiple-choice accuracy and per-domain statistics against naive
per-example computations."""
import json
import math
import os

import jax
import numpy as np
import pytest

from flexolmo_jax.checkpoint import saved
from flexolmo_jax.data import tasks
from flexolmo_jax.eval import generate, perplexity, scoring
from flexolmo_jax.model import logprobs
from flexolmo_jax.model.transformer import pure_model
from tests.helpers import lm_batch, save_random_public, tiny


@pytest.fixture(scope="module")
def model():
  cfg = tiny()
  return cfg, jax.tree.map(np.asarray, pure_model(cfg).init(3))


def naive_score(cfg, params, context, continuation):
  """Oracle: one unpadded example at a time."""
  tokens = (list(context) + list(continuation))[-(cfg.max_seq_len + 1):]
  logits, _ = pure_model(cfg)(params, np.asarray([tokens[:-1]]))
  z = np.asarray(logits[0], np.float64)
  logp = z - (z.max(-1, keepdims=True)
              + np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)))
  k = len(continuation)
  targets = tokens[1:][-k:]
  rows = logp[-k:]
  total = sum(rows[i, t] for i, t in enumerate(targets))
  return total, all(int(np.argmax(rows[i])) == t for i, t in enumerate(targets))


def test_scorer_matches_a_naive_loop(model):
  cfg, params = model
  rs = np.random.RandomState(0)
  requests = [(rs.randint(3, 259, n).tolist(), rs.randint(3, 259, k).tolist())
              for n, k in ((5, 1), (40, 7), (1, 3), (100, 30), (300, 4), (70, 70))]
  prompt = [10, 20, 30, 40]
  greedy = generate.generate(cfg, params, [prompt], 6)[0].tolist()
  requests.append((prompt, greedy[4:]))            # the greedy continuation itself
  got = scoring.Scorer(cfg, params, batch_size=4).score(requests)
  for (ctx, cont), (logp, is_greedy) in zip(requests, got):
    want, want_greedy = naive_score(cfg, params, ctx, cont)
    assert is_greedy == want_greedy
    np.testing.assert_allclose(logp, want, rtol=1e-5, atol=1e-4)
  assert got[-1][1] and not got[0][1]
  with pytest.raises(ValueError, match="at least one token"):
    scoring.Scorer(cfg, params).score([([1], [])])


def test_multiple_choice_accuracy(model, tmp_path):
  cfg, params = model
  vocab = tasks.vocabulary_from_spec("byte")
  questions = [{"context": "Paris is in", "choices": [" France", " Peru", " Mars"], "answer": 0},
               {"context": "2 + 2 =", "choices": [" 4", " five"], "answer": 1},
               {"context": "Ünïcode", "choices": [" ok", " nö"], "answer": 1}]
  path = tmp_path / "mc.jsonl"
  path.write_text("\n".join(json.dumps(q) for q in questions) + "\n\n", encoding="utf-8")
  got = scoring.multiple_choice(scoring.Scorer(cfg, params), vocab,
                                scoring.read_multiple_choice(str(path)))
  acc = acc_norm = 0
  for q in questions:
    ctx = list(vocab.encode(q["context"]))
    s = [naive_score(cfg, params, ctx, list(vocab.encode(c)))[0] for c in q["choices"]]
    n = [x / len(c.encode("utf-8")) for x, c in zip(s, q["choices"])]
    acc += int(np.argmax(s)) == q["answer"]
    acc_norm += int(np.argmax(n)) == q["answer"]
  assert got == {"acc": acc / 3, "acc_norm": acc_norm / 3, "questions": 3}
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps(questions[0]) + "\n{\"context\": \"x\", \"choices\": [\"a\"], "
                 "\"answer\": 0}\n")
  with pytest.raises(ValueError, match=r"bad\.jsonl, line 2: 'choices' must be"):
    scoring.read_multiple_choice(str(bad))
  bad.write_text("not json\n")
  with pytest.raises(ValueError, match=r"bad\.jsonl, line 1: not JSON"):
    scoring.read_multiple_choice(str(bad))


def test_domain_stats_loss_perplexity_and_bits_per_byte(model):
  cfg, params = model
  vocab = tasks.vocabulary_from_spec("byte")
  batch = lm_batch(259, batch=2, length=32)
  batch["decoder_target_tokens"][0, 5] = 1            # an EOS target: a token, not a byte
  scorer = logprobs.model_scorer(cfg, params)
  stats = perplexity.domain_stats(scorer, [batch], vocab=vocab)
  logp = np.asarray(scorer(batch), np.float64)
  w = batch["decoder_loss_weights"]
  nll = -np.sum(logp * w)
  nbytes = int(np.sum((w > 0) & (batch["decoder_target_tokens"] >= 3)))
  assert stats["tokens"] == int(w.sum()) and stats["bytes"] == nbytes < stats["tokens"]
  assert stats["loss"] == pytest.approx(nll / w.sum(), rel=1e-12)
  assert stats["perplexity"] == pytest.approx(math.exp(nll / w.sum()), rel=1e-12)
  assert stats["bits_per_byte"] == pytest.approx(nll / math.log(2) / nbytes, rel=1e-12)
  empty = {**batch, "decoder_loss_weights": np.zeros_like(w)}
  with pytest.raises(ValueError, match="news: no validation tokens .* validation split is empty"):
    perplexity.domain_stats(scorer, [empty], name="news")


def naive_levenshtein(a, b):
  d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
  for i in range(1, len(a) + 1):
    for j in range(1, len(b) + 1):
      d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
  return d[-1][-1]


def test_levenshtein_matches_the_textbook_recurrence():
  from flexolmo_jax.eval import extraction

  rs = np.random.RandomState(0)
  for _ in range(200):
    a = rs.randint(0, 4, rs.randint(0, 25)).tolist()
    b = rs.randint(0, 4, rs.randint(0, 25)).tolist()
    assert extraction.levenshtein(a, b) == naive_levenshtein(a, b)
  assert extraction.similarity([1, 2, 3, 4], [1, 2, 9, 4]) == 0.75


def test_extraction_finds_what_the_model_reproduces(model):
  """Documents the model itself writes greedily are extracted; random ones are not."""
  from flexolmo_jax.eval import extraction

  cfg, params = model
  rs = np.random.RandomState(1)
  prompts = rs.randint(3, 259, (3, 16))
  own = generate.generate(cfg, params, prompts, 48).tolist()       # 64 tokens each
  noise = rs.randint(3, 259, (3, 64)).tolist()
  short = [[5] * 10]
  config = extraction.ExtractionConfig(prefix=16, total=64, samples=2, min_length=64,
                                       temperature=0.0, top_k=None, top_p=None)
  got = extraction.extraction(cfg, params, own + noise + short, config)
  assert got["documents"] == 6
  assert got["per_document"][:3] == [1.0, 1.0, 1.0]
  assert max(got["per_document"][3:]) < 0.5
  assert got["extracted"] == 3 and got["rate"] == 0.5
  with pytest.raises(ValueError, match="No document has at least 64 tokens"):
    extraction.extraction(cfg, params, short, config)


def test_document_loss_matches_one_document_at_a_time(model):
  """Teacher-forced loss of documents of unequal length, batched with padding, equals a loop
  over each document alone through the model's own log-softmax."""
  from flexolmo_jax.eval import extraction
  from flexolmo_jax.model.transformer import pure_model

  cfg, params = model
  rs = np.random.RandomState(2)
  docs = [rs.randint(3, 259, n).tolist() for n in (40, 17, 64)]
  nll = count = 0.0
  for d in docs:
    d = d[:32]
    logits = np.asarray(pure_model(cfg)(params, np.asarray([d[:-1]]))[0][0], np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll -= np.sum(logits[np.arange(len(d) - 1), d[1:]] - logz)
    count += len(d) - 1
  assert extraction.document_loss(cfg, params, docs, 32) == pytest.approx(nll / count, rel=1e-5)


def test_flexolmo_eval_multiple_choice_cli(tmp_path, capsys):
  from flexolmo_jax import cli

  path, cfg, params = save_random_public(tmp_path / "model", seed=2)
  mc = tmp_path / "mc.jsonl"
  questions = [{"context": "a b", "choices": [" c", " dd"], "answer": 0},
               {"context": "xyz", "choices": ["1", "2", "3"], "answer": 2}]
  mc.write_text("\n".join(json.dumps(q) for q in questions))
  out = tmp_path / "r.json"
  assert cli.main(["eval", "--model", path, "--mc", f"toy={mc}", "--json", str(out)]) == 0
  want = scoring.multiple_choice(scoring.Scorer(cfg, params), tasks.vocabulary_from_spec("byte"),
                                 questions)
  assert json.loads(out.read_text())["toy"] == want
  assert "toy  acc" in capsys.readouterr().out
  assert cli.main(["eval", "--model", path, "--mc", "toy"]) == 2
  assert "'toy': write NAME=PATH" in capsys.readouterr().err


def test_router_probabilities_match_a_per_token_loop():
  from flexolmo_jax.eval import routing
  from flexolmo_jax.model.transformer import Transformer
  from flax import nnx
  from tests.helpers import spread_router

  cfg = tiny(experts=("public", "a", "b"), top_k=2, negative_bias=True)
  params = nnx.split(spread_router(Transformer(cfg, nnx.Rngs(0)), scale=0.05), nnx.Param)[1]
  params = jax.tree.map(np.asarray, params.to_pure_dict())
  params["blocks"]["ffn"]["negative_bias"] = np.asarray(
      [[0.0, -0.5, 0.3]] * cfg.n_layers, np.float32)    # b > 0 is clipped to 0; public has none
  batches = [lm_batch(cfg.vocab_size, batch=2, length=24, seed=s) for s in (0, 1)]
  got = routing.router_probabilities(cfg, params, batches)

  total, count = np.zeros(3), 0.0
  for batch in batches:
    _, _, hidden = pure_model(cfg)(params, batch["decoder_input_tokens"],
                                   positions_bt=batch["decoder_positions"],
                                   segment_ids_bt=batch["decoder_segment_ids"], return_hidden=True)
    h = np.asarray(hidden.router_inputs, np.float64)
    for b, t in zip(*np.nonzero(batch["decoder_loss_weights"])):
      p = np.zeros(3)
      for layer in range(cfg.n_layers):
        z = params["blocks"]["ffn"]["router_embedding"][layer] @ h[layer, b, t]
        z = z + np.minimum(params["blocks"]["ffn"]["negative_bias"][layer], 0) * [0, 1, 1]
        p += np.exp(z - z.max()) / np.exp(z - z.max()).sum() / cfg.n_layers
      total, count = total + p, count + 1
  np.testing.assert_allclose([got[e] for e in ("public", "a", "b")], total / count, rtol=1e-5)
  assert abs(sum(got.values()) - 1) < 1e-5
  with pytest.raises(ValueError, match="dense"):
    routing.router_probabilities(tiny(), pure_model(tiny()).init(0), batches)


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
