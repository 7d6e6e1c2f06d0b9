"""A data owner who joins after the merge and router tuning: trained against the merged model
itself, its expert is added with every existing row and expert left bit-identical."""
import os

import jax
import numpy as np
import pytest

from flexolmo_jax.checkpoint import merged_model, store
from flexolmo_jax.data import tasks, vocabularies
from flexolmo_jax.demo.sizes import EXPERT_FLAGS, SIZES
from flexolmo_jax.eval import perplexity
from flexolmo_jax.flexolmo import expert, merge
from tests.artifacts import genome_reads
from tests.e2e.fixtures import DEMO_READERS, user_compile_env, validation
from tests.helpers import run_cli


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


@DEMO_READERS[0]
@DEMO_READERS[1]
@pytest.mark.slow
def test_an_owner_of_a_domain_flexmix_lacks_joins_the_tuned_demo_model(demo_run, flexmix,
                                                                       tmp_path):
  """A new owner whose text is like none of FlexMix-mini's (synthetic DNA reads) trains as the
  demo's owners do, against the demo's tuned model, and is merged into it: the loss on its
  domain falls, and every other domain stays within 0.03.

  The builder gives this expert a stronger prior than the demo's owners got (an expert bias of
  -4, not -2): trained on text this narrow, its outputs off its domain are large, and even the
  small share of the router's weight it gets elsewhere moves legal by 0.035 at -2. At quick
  size (genome / the largest move elsewhere, legal in each): -2 1.32 / 0.035, -3 2.25 / 0.027,
  -3.5 2.77 / 0.023, -4 3.17 / 0.020, -6 3.83 / 0.010; before joining, genome 4.37."""
  size = SIZES["quick"]
  tuned = os.path.join(demo_run["workdir"], "tuned", "merged")
  data = str(genome_reads(tmp_path / "genome.jsonl"))
  run = run_cli(["train-expert", "--public", tuned, "--name", "genome", "--data", data,
                 "--out", str(tmp_path / "genome"), "--steps", str(size.expert_steps),
                 "--warmup", str(size.expert_steps // 10), "--lr", "3e-3",
                 "--batch-size", str(size.batch), "--seq-len", str(size.seq), *EXPERT_FLAGS],
                env=user_compile_env())
  assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
  run = run_cli(["merge", "--public", tuned, "--expert", str(tmp_path / "genome"),
                 "--out", str(tmp_path / "joined"), f"--expert-bias={2 * size.expert_bias}"])
  assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
  batches = validation(flexmix)
  vocab = vocabularies.load("byte")
  batches["genome"] = list(tasks.eval_batches({"genome": [data]}, vocab,
                                               str(tmp_path / "eval_data"), size.seq,
                                               size.batch)["genome"])
  before = perplexity.evaluate(tuned, batches)
  after = perplexity.evaluate(str(tmp_path / "joined"), batches)
  assert after["genome"] < before["genome"] - 1.0, (before, after)
  for domain in flexmix:
    assert abs(after[domain] - before[domain]) <= 0.03, (domain, before, after)
  rows, joined = merged_model.read_router(tuned), merged_model.read_router(str(tmp_path / "joined"))
  for key, value in rows.items():
    np.testing.assert_array_equal(joined[key], value, err_msg=key)
