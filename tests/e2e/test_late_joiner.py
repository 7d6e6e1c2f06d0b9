"""A data owner who joins after the merge and router tuning: trained against the merged model
itself, its expert is added with every existing row and expert left bit-identical."""
import jax
import numpy as np
import pytest

from flexolmo_jax.checkpoint import merged_model, store
from flexolmo_jax.flexolmo import expert, merge


def test_an_owner_joins_a_tuned_model_and_is_added_leaving_every_row_untouched(
    tiny, tmp_path):
  """A late joiner trains against the merged (here: tuned) model itself: its expert's public
  row is the model's live one, so the merge accepts it, and every row and expert already there
  is bit-identical afterwards. Trained against the bare public model instead, it is refused with
  the way to fix it."""
  from flexolmo_jax.train import loop
  from tests.artifacts import owner_data

  merged_all = merge.merge(tiny["public"], list(tiny["experts"].values()),
                           str(tmp_path / "merged"), progress=lambda _: None)
  live = merged_model.read_router(merged_all)
  rs = np.random.RandomState(7)
  retuned = {k: (v + 0.1 * rs.standard_normal(v.shape)).astype(np.float32)
             if k.endswith("/router") else v for k, v in live.items()}
  tuned = merge.merge(merged_all, [], str(tmp_path / "tuned"), router=retuned,
                      router_record={"source": "tune-router"}, progress=lambda _: None)
  train = loop.TrainConfig(steps=2, batch_size=8, seq_len=32, warmup_steps=1, log_every=1,
                           checkpoint_every=2, async_checkpoints=False, peak_tflops=1.0)
  data = [str(owner_data(tmp_path / "shell.jsonl"))]
  _, late = expert.train_expert(public=tuned, name="shell", data=data,
                                output_dir=str(tmp_path / "shell"), train=train)
  card = store.read_manifest(late, "expert")
  assert card["public_router_fingerprint"] == merge.router_fingerprint(retuned["public/router"])
  assert card["anchor_fingerprint"] == store.read_manifest(tiny["public"])["fingerprint"]

  joined = merge.merge(tuned, [late], str(tmp_path / "joined"), progress=lambda _: None)
  rows = merged_model.read_router(joined)
  for key, value in retuned.items():
    np.testing.assert_array_equal(rows[key], value, err_msg=key)
  np.testing.assert_array_equal(rows["shell/router"], store.load_params(late)["router"])
  _, before = merged_model.load_merged(tuned)
  _, after = merged_model.load_merged(joined, exclude="shell")
  np.testing.assert_array_equal(after["blocks"]["ffn"].pop("negative_bias"),
                                before["blocks"]["ffn"].pop("negative_bias"))
  jax.tree.map(np.testing.assert_array_equal, after, before)

  _, stray = expert.train_expert(public=tiny["public"], name="stray", data=data,
                                 output_dir=str(tmp_path / "stray"), train=train,
                                 expert=expert.ExpertConfig(router_init="random"))
  with pytest.raises(ValueError, match="train-expert --public MERGED_DIR"):
    merge.merge(tuned, [stray], str(tmp_path / "refused"), progress=lambda _: None)
