"""The log-likelihood scorer, multiple-choice accuracy and per-domain statistics against naive
per-example computations."""
import json
import math

import jax
import numpy as np
import pytest

from flexolmo_jax.data import vocabularies
from flexolmo_jax.eval import generate, perplexity, scoring
from flexolmo_jax.model import logprobs
from flexolmo_jax.model.transformer import pure_model
from tests.helpers import lm_batch, logits_of, save_random_public, tiny


@pytest.fixture(scope="module")
def model():
  cfg = tiny()
  return cfg, jax.tree.map(np.asarray, pure_model(cfg).init(3))


def naive_score(cfg, params, context, continuation):
  """Oracle: one unpadded example at a time."""
  tokens = (list(context) + list(continuation))[-(cfg.max_seq_len + 1):]
  z = np.asarray(logits_of(cfg, params, np.asarray([tokens[:-1]]))[0], np.float64)
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
  vocab = vocabularies.load("byte")
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
  vocab = vocabularies.load("byte")
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

  cfg, params = model
  rs = np.random.RandomState(2)
  docs = [rs.randint(3, 259, n).tolist() for n in (40, 17, 64)]
  nll = count = 0.0
  for d in docs:
    d = d[:32]
    logits = np.asarray(logits_of(cfg, params, np.asarray([d[:-1]]))[0], np.float64)
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
  want = scoring.multiple_choice(scoring.Scorer(cfg, params), vocabularies.load("byte"),
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


def test_layer_routing_and_row_geometry_match_a_per_token_loop():
  from flexolmo_jax.eval import routing
  from flexolmo_jax.model.transformer import Transformer
  from flax import nnx
  from tests.helpers import spread_router

  cfg = tiny(experts=("public", "a", "b"), top_k=2, negative_bias=True)
  params = nnx.split(spread_router(Transformer(cfg, nnx.Rngs(1)), scale=0.05), nnx.Param)[1]
  params = jax.tree.map(np.asarray, params.to_pure_dict())
  ffn = params["blocks"]["ffn"]
  ffn["negative_bias"] = np.asarray([[0.0, -0.5, 0.3]] * cfg.n_layers, np.float32)
  batches = [lm_batch(cfg.vocab_size, batch=2, length=24, seed=s) for s in (0, 1)]
  got = routing.layer_routing(cfg, params, batches)

  sums = {k: np.zeros((cfg.n_layers, 3)) for k in ("probs", "logits", "top1")}
  spread, norm, count = np.zeros(cfg.n_layers), np.zeros(cfg.n_layers), 0
  for batch in batches:
    _, _, hidden = pure_model(cfg)(params, batch["decoder_input_tokens"],
                                   positions_bt=batch["decoder_positions"],
                                   segment_ids_bt=batch["decoder_segment_ids"], return_hidden=True)
    h = np.asarray(hidden.router_inputs, np.float64)
    for b, t in zip(*np.nonzero(batch["decoder_loss_weights"])):
      for layer in range(cfg.n_layers):
        x = h[layer, b, t]
        z = ffn["router_embedding"][layer] @ x + np.minimum(ffn["negative_bias"][layer], 0) * [0, 1, 1]
        sums["logits"][layer] += z
        sums["probs"][layer] += np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        sums["top1"][layer, np.argmax(z)] += 1
        spread[layer] += z.std()
        norm[layer] += np.linalg.norm(x)
      count += 1
  for k, v in sums.items():
    np.testing.assert_allclose(got[k], v / count, rtol=1e-4, atol=1e-6, err_msg=k)
  np.testing.assert_allclose(got["spread"], spread / count, rtol=1e-4)
  np.testing.assert_allclose(got["hidden_norm"], norm / count, rtol=1e-4)

  geometry = routing.row_geometry(cfg, params)
  rows = np.asarray(ffn["router_embedding"], np.float64)
  for layer in range(cfg.n_layers):
    for i in range(3):
      assert geometry["norm"][layer, i] == pytest.approx(np.linalg.norm(rows[layer, i]))
      for j in range(3):
        cos = rows[layer, i] @ rows[layer, j] / np.linalg.norm(rows[layer, i]) / np.linalg.norm(
            rows[layer, j])
        assert geometry["cosine"][layer, i, j] == pytest.approx(cos)
  np.testing.assert_array_equal(geometry["negative_bias"], [[0.0, -0.5, 0.0]] * cfg.n_layers)


def test_eval_routing_reports_the_router_of_a_merged_model(world, tmp_path, capsys):
  from tests.artifacts import refused

  out = tmp_path / "eval.json"
  data = ["--data", f"code={world['data']}", "--data-dir", str(tmp_path / "prepared"),
          "--seq-len", "32"]
  from flexolmo_jax import cli

  capsys.readouterr()
  assert cli.main(["eval", "--model", world["merged"], *data, "--routing", "--json",
                   str(out)]) == 0
  text = capsys.readouterr().out
  report = json.loads(out.read_text())["routing"]
  assert report["experts"] == ["public", "code"] and report["top_k"] == 2
  probs = np.asarray(report["domains"]["code"]["probs"])
  n_layers = probs.shape[0]
  np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(report["rows"]["cosine"])[:, [0, 1], [0, 1]], 1.0,
                             rtol=1e-6)
  assert f"layer {n_layers - 1} cos(public)" in text and "code mean prob" in text
  refused(capsys, "eval", "--model", world["public"], *data, "--routing", naming="dense model")
  refused(capsys, "eval", "--model", world["merged"], "--routing", naming="--data")
