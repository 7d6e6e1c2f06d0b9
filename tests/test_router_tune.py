"""Router tuning on public proxy data: it helps, and it never opens closed data."""

import pytest



def test_expert_dropout_masks_keep_public_and_drop_each_owner_per_sequence():
  import numpy as np

  from flexolmo_jax.flexolmo import router_tune

  names = ("public", "code", "math", "news")
  keep = router_tune.expert_keep(names, (4000, 16), 0.25, (0, 7))
  assert keep.shape == (4000, 16, 4) and keep.dtype == bool
  assert keep[..., 0].all()                                  # public is never dropped
  assert (keep == keep[:, :1]).all()                         # one choice per sequence
  share = keep[:, 0, 1:].mean(axis=0)
  np.testing.assert_allclose(share, 0.75, atol=0.03)        # each owner kept 1 - dropout
  # Deterministic in the seed (a resumed run sees the same masks), different across steps.
  np.testing.assert_array_equal(keep, router_tune.expert_keep(names, (4000, 16), 0.25, (0, 7)))
  assert (keep != router_tune.expert_keep(names, (4000, 16), 0.25, (0, 8))).any()
  with pytest.raises(ValueError, match="expert_dropout=1.0 not in"):
    router_tune.RouterTuneConfig(expert_dropout=1.0)
