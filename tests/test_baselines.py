"""Dense baselines continued from the public model, model soup and the BTM ensemble."""

import numpy as np
import pytest

from flexolmo_jax.baselines import btm


def naive_btm(logp, positions, tau, top_k=None):
  """Loop oracle: weights from the summed NLL of the document's earlier tokens."""
  m, b, t = logp.shape
  out = np.zeros((b, t))
  for i in range(b):
    for j in range(t):
      start = j - positions[i, j]
      context = -logp[:, i, start:j].sum(axis=1)
      s = -context / tau
      if top_k is not None:
        s = np.where(s >= np.sort(s)[-top_k], s, -np.inf)
      w = np.exp(s - s.max())
      w /= w.sum()
      out[i, j] = np.log(np.sum(w * np.exp(logp[:, i, j])))
  return out


@pytest.mark.parametrize("top_k", [None, 2])
def test_btm_mixture_equals_the_loop_oracle(top_k):
  rs = np.random.RandomState(0)
  logp = np.log(rs.uniform(0.01, 1.0, (3, 2, 12)))
  positions = np.array([list(range(5)) + list(range(7)), list(range(12))])
  got = btm.ensemble_logprobs(logp, positions, tau=0.7, top_k=top_k)
  np.testing.assert_allclose(np.asarray(got), naive_btm(logp, positions, 0.7, top_k), rtol=1e-5)
