"""Router tuning on public proxy data: it helps, and it never opens closed data."""

import numpy as np
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
  for bad in (0.0, 1.5):
    with pytest.raises(ValueError, match=f"interpolation={bad} not in"):
      router_tune.RouterTuneConfig(interpolation=bad)


def test_router_tuning_pads_experts_to_the_expert_axis_and_saves_its_own(tiny, tmp_path):
  """5 experts over an expert axis of 4 are padded to 8 with zero experts: 3 steps of router
  tuning give the router rows of the same run without an expert axis, and the tuned model
  holds its 5 experts alone."""
  import json

  from flexolmo_jax.checkpoint import merged_model
  from flexolmo_jax.config import MeshConfig
  from flexolmo_jax.flexolmo import merge, router_tune
  from flexolmo_jax.train import loop

  merged = merge.merge(tiny["public"], list(tiny["experts"].values()), str(tmp_path / "merged"),
                       progress=lambda *_: None)
  rs = np.random.RandomState(0)
  words = ["model", "expert", "data", "router", "owner", "public", "token", "layer"]
  corpus = tmp_path / "public.jsonl"
  corpus.write_text("".join(json.dumps({"text": " ".join(rs.choice(words, 40))}) + "\n"
                            for _ in range(200)))

  def tuned(mesh, out, interpolation=1.0):
    train = loop.TrainConfig(steps=3, batch_size=8, seq_len=32, warmup_steps=1, log_every=3,
                             learning_rate=1e-2, checkpoint_every=3, peak_tflops=1.0,
                             async_checkpoints=False, mesh=mesh)
    _, path = router_tune.tune_router(merged, [str(corpus)], str(tmp_path / out), train,
                                      router_tune.RouterTuneConfig(
                                          proxy_weight=0.0, interpolation=interpolation))
    return merged_model.open_merged(path)[2], merged_model.read_router(path)

  cfg_plain, plain = tuned(MeshConfig(fsdp=8), "plain")
  cfg_ep, ep = tuned(MeshConfig(fsdp=2, expert=4), "expert_axis")
  assert cfg_ep.experts == cfg_plain.experts and len(cfg_ep.experts) == 5
  assert cfg_ep.expert_rows == 0 and sorted(ep) == sorted(plain)
  untuned = merged_model.read_router(merged)
  for key in plain:
    np.testing.assert_allclose(ep[key], plain[key], atol=1e-6, rtol=1e-5)
  assert any(not np.allclose(plain[k], untuned[k]) for k in plain if k.endswith("/router"))
  # Interpolated: the same run's rows, moved a third of the way from the merge's; the negative
  # biases are the merge's.
  _, third = tuned(MeshConfig(fsdp=8), "third", interpolation=1 / 3)
  assert sorted(third) == sorted(plain)
  for key in plain:
    want = untuned[key] + (plain[key] - untuned[key]) / 3 if key.endswith("/router") else untuned[key]
    np.testing.assert_allclose(third[key], want, atol=1e-7, rtol=1e-6, err_msg=key)
