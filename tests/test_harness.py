"""The lm-evaluation-harness model class against naive oracles on a tiny random model: rolling
log-likelihood against a token-by-token sum, conditional log-likelihood against the same, and
generate_until against greedy decoding cut at the stop string."""
import numpy as np
import pytest

from flexolmo_jax.eval import generate
from flexolmo_jax.model.transformer import pure_model


class Request:
  def __init__(self, *args):
    self.args = args


def naive_logprob(cfg, params, context, continuation):
  """log p(continuation | context) from one unbatched, unpadded forward of context +
  continuation (the causal model's next-token distributions): the oracle."""
  tokens = (list(context) + list(continuation))[-(cfg.max_seq_len + 1):]
  logits = np.asarray(pure_model(cfg)(params, np.array([tokens[:-1]]))[0], np.float64)[0]
  logz = np.logaddexp.reduce(logits, axis=-1)
  picked = logits[np.arange(len(tokens) - 1), tokens[1:]] - logz
  return float(picked[-len(continuation):].sum())


@pytest.fixture(scope="module")
def lm(tiny):
  from flexolmo_jax.eval.harness import FlexOlmoLM

  return FlexOlmoLM(tiny["public"], batch_size=4)


def test_rolling_loglikelihood_is_the_sum_over_every_token(lm):
  """Each token conditioned on what precedes it (the first on EOS); a text longer than
  max_seq_len is cut into disjoint windows, so each window starts afresh."""
  cfg, params = lm.cfg, lm.params
  short = "def f(x):\n    return x\n"
  ids = lm.tok_encode(short)
  want = naive_logprob(cfg, params, [lm.eot_token_id], ids)
  long = "spam and eggs " * ((cfg.max_seq_len + 20) // 14)
  ids_long = lm.tok_encode(long)
  n = cfg.max_seq_len
  want_long = (naive_logprob(cfg, params, [lm.eot_token_id], ids_long[:n])
               + naive_logprob(cfg, params, ids_long[n - cfg.max_seq_len:n], ids_long[n:]))
  got = lm.loglikelihood_rolling([Request(short), Request(long)])
  np.testing.assert_allclose(got, [want, want_long], rtol=1e-5)


def test_loglikelihood_and_greedy_of_a_continuation(lm):
  cfg, params = lm.cfg, lm.params
  (logp, greedy), = lm.loglikelihood([Request("The capital is", " Paris")])
  context, continuation = lm.tok_encode("The capital is"), lm.tok_encode(" Paris")
  np.testing.assert_allclose(logp, naive_logprob(cfg, params, context, continuation), rtol=1e-5)
  assert greedy is False or greedy is True


def test_generate_until_is_greedy_decoding_cut_at_the_stop_string(lm):
  cfg, params = lm.cfg, lm.params
  prompt = lm.tok_encode("x = ")
  row = generate.generate(cfg, params, [prompt], 10, eos_id=lm.eot_token_id)[0]
  text = lm.tok_decode(generate.trim(row, len(prompt), lm.eot_token_id)[len(prompt):])
  stop = text[3:5] if len(text) > 5 else "\x00"
  got = lm.generate_until([Request("x = ", {"until": [stop], "max_gen_toks": 10}),
                           Request("x = ", {"until": [], "max_gen_toks": 10})])
  assert got == [text.split(stop)[0], text]
  with pytest.raises(ValueError, match="decodes greedily"):
    lm.generate_until([Request("x", {"do_sample": True, "temperature": 1.0})])
