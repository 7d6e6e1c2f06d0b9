"""Generation with a KV cache against full recomputation, and the sampling filters."""
import jax
import numpy as np
import pytest
from flax import nnx

from flexolmo_jax.eval import generate
from flexolmo_jax.model.transformer import KVCache, Transformer, pure_model
from tests.helpers import save_random_public, spread_router, tiny


def naive_greedy(cfg, params, prompt, n):
  """Oracle: the whole sequence recomputed for every new token (a fixed-length window, so one
  compilation; causal attention ignores the unwritten tail)."""
  model = pure_model(cfg)
  forward = jax.jit(lambda p, t: model(p, t)[0][0])
  tokens = np.zeros(len(prompt) + n, np.int32)
  tokens[:len(prompt)] = prompt
  for i in range(len(prompt), len(prompt) + n):
    tokens[i] = int(np.argmax(forward(params, tokens[None])[i - 1]))
  return tokens.tolist()


@pytest.fixture(scope="module", params=["dense", "moe"])
def model(request):
  cfg = tiny() if request.param == "dense" else tiny(experts=("public", "a", "b"), top_k=2)
  module = Transformer(cfg, nnx.Rngs(0))
  if cfg.is_moe:
    spread_router(module)
  return cfg, jax.tree.map(np.asarray, nnx.state(module, nnx.Param).to_pure_dict())


def test_cached_logits_equal_the_full_forward(model):
  cfg, params = model
  toks = np.random.RandomState(0).randint(3, 259, (2, 20))
  m = pure_model(cfg)
  full, _ = jax.jit(lambda p, t: m(p, t))(params, toks)
  cached = jax.jit(lambda p, t, c: m(p, t, cache=c))
  cache = KVCache.empty(cfg, 2, 24)
  first, _, cache = cached(params, toks[:, :12], cache)
  rest = []
  for t in range(12, 20):
    logits, _, cache = cached(params, toks[:, t:t + 1], cache)
    rest.append(logits)
  np.testing.assert_allclose(np.concatenate([first, *rest], axis=1), full, atol=2e-5, rtol=0)
  assert int(cache.index) == 20


def test_greedy_equals_recomputation(model):
  cfg, params = model
  prompt = [5, 80, 120, 33, 200, 7]
  got = generate.generate(cfg, params, [prompt, prompt[::-1]], 20)
  assert got[0].tolist() == naive_greedy(cfg, params, prompt, 20)
  assert got[1].tolist() == naive_greedy(cfg, params, prompt[::-1], 20)


def test_sampling_is_seeded_and_top_k_1_is_greedy(model):
  cfg, params = model
  prompt = [[5, 80, 120, 33]] * 3
  s = lambda **kw: generate.generate(cfg, params, prompt, 24, generate.Sampling(**kw))
  a, b = s(temperature=1.0, seed=1), s(temperature=1.0, seed=1)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, s(temperature=1.0, seed=2))
  assert len({tuple(r) for r in a}) > 1          # rows draw independently
  np.testing.assert_array_equal(s(temperature=0.7, top_k=1, seed=3), s())


def test_eos_stops_a_row_and_pads_the_rest():
  cfg = tiny()
  params = pure_model(cfg).init(0)
  params["lm_head"] = np.zeros_like(params["lm_head"])
  params["lm_head"][:, 1] = 1.0      # eos is always the most likely token
  out = generate.generate(cfg, params, [[9, 9, 9]], 10, eos_id=1, pad_id=0)
  assert out[0].tolist()[:5] == [9, 9, 9, 1, 0]
  assert generate.trim(out[0], 3, eos_id=1) == [9, 9, 9, 1]


def test_filters_match_a_naive_oracle():
  rs = np.random.RandomState(0)
  logits = rs.randn(4, 30).astype(np.float32)
  for top_k, top_p in ((5, None), (None, 0.6), (8, 0.3), (None, 1e-6)):
    got = np.asarray(generate.filter_logits(logits, top_k, top_p)) > -1e30
    for row, keep in zip(logits, got):
      order = np.argsort(-row)
      allowed = set(order[:top_k]) if top_k else set(order)
      if top_p:
        sub = row[[i for i in order if i in allowed]]
        p = np.exp(sub - sub.max())
        p /= p.sum()
        n = int(np.searchsorted(np.cumsum(p), top_p) + 1)
        allowed = set([i for i in order if i in allowed][:n])
      assert set(np.flatnonzero(keep)) == allowed
  with pytest.raises(ValueError, match="top_p"):
    generate.Sampling(top_p=1.5)


def test_flexolmo_generate_cli(tmp_path, capsys):
  from flexolmo_jax import cli
  from flexolmo_jax.data import vocabularies

  path, cfg, params = save_random_public(tmp_path / "model", seed=1)
  assert cli.main(["generate", "--model", path, "--prompt", "héllo", "--max-new-tokens", "12"]) == 0
  out = capsys.readouterr().out
  vocab = vocabularies.load("byte")
  ids = list(vocab.encode("héllo"))
  row = generate.generate(cfg, params, [ids], 12, eos_id=1)[0]
  new = [t for t in generate.trim(row, len(ids), 1)[len(ids):] if t != 1]
  assert out.endswith("héllo" + vocab.decode(new) + "\n")
  assert cli.main(["generate", "--model", path, "--prompt", "abc", "--max-new-tokens", "6",
                   "--temperature", "1", "--top-k", "20", "--seed", "4",
                   "--num-samples", "2"]) == 0
  assert "sample 2/2" in capsys.readouterr().out
  assert cli.main(["generate", "--model", path, "--prompt", "abc", "--exclude", "x"]) == 2
  assert "apply to merged models" in capsys.readouterr().err


def test_process_0_of_a_multi_process_launch_generates_like_one_process(tmp_path, capsys):
  from flexolmo_jax import cli

  path, _, _ = save_random_public(tmp_path / "model", seed=1)
  argv = ["generate", "--model", path, "--prompt", "abc", "--max-new-tokens", "8"]
  launched = [*argv, "--coordinator", "localhost:1", "--num-processes", "2"]
  assert cli.main(argv) == 0
  alone = capsys.readouterr().out
  assert cli.main([*launched, "--process-id", "1"]) == 0
  assert "has nothing to do" in capsys.readouterr().out
  assert cli.main([*launched, "--process-id", "0"]) == 0
  assert capsys.readouterr().out == alone


def test_a_longer_cache_gives_the_same_tokens(model):
  """A bucketed KV cache (positions past the written ones masked) changes nothing."""
  cfg, params = model
  prompt = np.random.RandomState(2).randint(3, cfg.vocab_size, (2, 7))
  want = generate.generate(cfg, params, prompt, 12)
  np.testing.assert_array_equal(generate.generate(cfg, params, prompt, 12, cache_len=64), want)
