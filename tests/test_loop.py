"""The shared training loop on synthetic batches: objective, accumulation, checkpoints, resume."""
import json
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexolmo_jax import sharding
from flexolmo_jax.model.transformer import pure_model, run_on_batch
from flexolmo_jax.train import checkpoints, loop, metrics, objective, optim
from tests.helpers import lm_batch, synthetic_stream, tiny

RULES = sharding.ShardingRules()


def make_trainer(workdir, stream=None, **train_changes):
  cfg = tiny()
  model = pure_model(cfg)
  settings = dict(steps=6, batch_size=8, seq_len=32, warmup_steps=2, log_every=1,
                  checkpoint_every=2, peak_tflops=1.0, async_checkpoints=True)
  settings.update(train_changes)
  tcfg = loop.TrainConfig(**settings)
  mesh = sharding.make_mesh(tcfg.mesh)
  apply = lambda p, _, b: run_on_batch(model, p, b)
  return loop.Trainer(
      tcfg, workdir=str(workdir), apply=apply, params=model.init(0), frozen={},
      param_shardings=model.shardings(mesh, RULES), frozen_shardings={}, mesh=mesh, rules=RULES,
      stream=stream or synthetic_stream(cfg.vocab_size, 8, 32),
      eval_streams={"val": lambda: iter([lm_batch(cfg.vocab_size, 5, 32, seed=99)])},
      flops_per_token=metrics.flops_per_token(cfg, 32))


def train_losses(workdir):
  """{step: loss} of the train records of metrics.jsonl (the last record of a step wins)."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as fh:
    for line in fh:
      rec = json.loads(line)
      if rec["kind"] == "train":
        out[rec["step"]] = rec["loss"]
  return out


def test_loss_is_masked_token_mean_cross_entropy():
  cfg = tiny()
  model = pure_model(cfg)
  params = model.init(0)
  batch = lm_batch(cfg.vocab_size, 2, 16)
  logits, _ = model(params, batch["decoder_input_tokens"], positions_bt=batch["decoder_positions"],
                    segment_ids_bt=batch["decoder_segment_ids"])
  sums = objective.lm_loss_sums(logits, batch)
  # Naive oracle: per-token -log softmax at the target, over the weighted positions only.
  logp = np.asarray(jax.nn.log_softmax(logits, -1))
  w = batch["decoder_loss_weights"]
  nll = -np.take_along_axis(logp, batch["decoder_target_tokens"][..., None], -1)[..., 0]
  assert float(sums.weight) == w.sum() == 2 * 12
  np.testing.assert_allclose(float(sums.nll), (nll * w).sum(), rtol=1e-6)


def test_grad_accumulation_equals_the_whole_batch(tmp_path):
  one = make_trainer(tmp_path / "a", steps=1, checkpoint_every=1)
  two = make_trainer(tmp_path / "b", steps=1, checkpoint_every=1, grad_accum=2)
  p1, p2 = one.train().params, two.train().params
  moved = 0.0
  for a, b, init in zip(jax.tree.leaves(p1), jax.tree.leaves(p2),
                        jax.tree.leaves(pure_model(tiny()).init(0))):
    # Adam's first step moves each weight by about the learning rate (9e-4) whatever its
    # gradient's size, so where a gradient is near zero the rounding of the two summation orders
    # shows: up to 2.4e-6 on one weight of 16,384 on some CPUs.
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-6)
    moved = max(moved, float(jnp.max(jnp.abs(a - init))))
  assert moved > 1e-4   # the step did update the parameters


def test_metrics_tensorboard_and_checkpoints_are_written(tmp_path):
  result = make_trainer(tmp_path, keep_checkpoints=2).train()
  assert result.step == 6 and not result.preempted
  recs = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  train = [r for r in recs if r["kind"] == "train"]
  assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
  assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(train[-1])
  # Warm-up then cosine: lr at step s is the schedule at s-1 (the value the update used).
  sched = optim.schedule(9e-4, 6, 2, 0.1)
  assert [r["lr"] for r in train] == pytest.approx([float(sched(s - 1)) for s in range(1, 7)])
  assert recs[-1]["kind"] == "eval" and recs[-1]["loss"]["val"] > 0
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "6"]   # keep-last-2
  # Tokens: 8 rows x 28 weighted positions a step.
  assert result.tokens_seen == 6 * 8 * 28 and result.documents_seen == 6 * 8 * 2


def test_router_lr_scale_scales_exactly_the_router_updates():
  rs = np.random.RandomState(0)
  params = {"w_gate": rs.randn(3, 4).astype(np.float32), "router": rs.randn(2, 4).astype(
      np.float32), "negative_bias": rs.randn(2).astype(np.float32)}
  grads = jax.tree.map(lambda p: np.float32(0.1) * np.ones_like(p), params)

  def update(scale):
    cfg = loop.TrainConfig(learning_rate=1e-2, warmup_steps=0, router_lr_scale=scale)
    tx = optim.adamw(cfg, params)
    return tx.update(grads, tx.init(params), params)[0]

  full, half, held = update(1.0), update(0.5), update(0.0)
  np.testing.assert_array_equal(half["w_gate"], full["w_gate"])
  np.testing.assert_array_equal(held["w_gate"], full["w_gate"])
  for name in ("router", "negative_bias"):
    np.testing.assert_allclose(half[name], 0.5 * full[name], rtol=1e-6)
    np.testing.assert_array_equal(held[name], 0.0)
    assert np.all(np.abs(full[name]) > 0)
  with pytest.raises(ValueError, match="router_lr_scale"):
    loop.TrainConfig(router_lr_scale=-1.0)


def test_sigterm_saves_and_the_rerun_continues_with_identical_losses(tmp_path):
  reference = make_trainer(tmp_path / "ref")
  reference.train()
  vocab = tiny().vocab_size

  def preempting_stream(start):
    for i, batch in enumerate(synthetic_stream(vocab, 8, 32)(start)):
      if start + i == 3:          # while step 4 is being fed: the scheduler preempts us
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch

  first = make_trainer(tmp_path / "run", stream=preempting_stream).train()
  assert first.preempted and first.step == 4
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["2", "4"]
  second = make_trainer(tmp_path / "run").train()
  assert second.step == 6 and not second.preempted
  assert train_losses(tmp_path / "run") == train_losses(tmp_path / "ref")
  for a, b in zip(jax.tree.leaves(second.params), jax.tree.leaves(reference.state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert second.tokens_seen == 6 * 8 * 28


def test_unfinished_checkpoints_are_never_restored(tmp_path):
  make_trainer(tmp_path, steps=4).train()
  ckpts = tmp_path / "checkpoints"
  # An async save killed half-way leaves Orbax's temporary directory; a copied step directory
  # without its finalization marker is not complete either. Both are newer than step 4.
  shutil.copytree(ckpts / "4", ckpts / "9.orbax-checkpoint-tmp-1234")
  shutil.copytree(ckpts / "4", ckpts / "8")
  os.remove(ckpts / "8" / "_CHECKPOINT_METADATA")
  assert not checkpoints.is_complete(ckpts / "8") and checkpoints.is_complete(ckpts / "4")
  trainer = make_trainer(tmp_path, steps=6)
  mgr = checkpoints.manager(str(tmp_path), keep=3, asynchronous=False)
  state, meta = checkpoints.restore(mgr, trainer.state, trainer.state_shardings,
                                    trainer.stream_settings())
  mgr.close()
  assert meta["step"] == 4 and int(state.step) == 4


def test_resume_refuses_a_changed_data_stream(tmp_path):
  make_trainer(tmp_path, steps=2).train()
  with pytest.raises(ValueError, match="batch_size"):
    make_trainer(tmp_path, steps=4, batch_size=16).train()


def test_config_validation():
  with pytest.raises(ValueError, match="grad_accum"):
    loop.TrainConfig(batch_size=6, grad_accum=4)
  with pytest.raises(ValueError, match="steps"):
    loop.TrainConfig(steps=0)



def test_adam_moments_are_sharded_like_their_parameters(tmp_path):
  """On an FSDP mesh each device holds its slice of the moments, not all of them: the state's
  shardings equal the parameters' before and after a step (a replicated state would cost every
  device 2x the trainable parameters in fp32)."""
  from jax.sharding import PartitionSpec as P

  from flexolmo_jax.config import MeshConfig

  trainer = make_trainer(tmp_path, mesh=MeshConfig(data=2, fsdp=4))
  params = trainer.state.params
  sharded = [leaf.sharding.spec for leaf in jax.tree.leaves(params)
             if "fsdp" in str(leaf.sharding.spec)]
  assert sharded, "the tiny model has parameters sharded over fsdp"
  for _ in range(2):
    for moment in ("mu", "nu"):
      (_, tree), = optax_moments(trainer.state.opt_state, moment)
      got = jax.tree.map(lambda x: x.sharding.spec, tree)
      assert got == jax.tree.map(lambda x: x.sharding.spec, params), moment
      count = optax_moments(trainer.state.opt_state, "count")[0][1]
      assert count.sharding.spec == P()
    trainer.step(next(synthetic_stream(tiny().vocab_size, 8, 32)(0)))


def optax_moments(opt_state, name):
  import optax

  return optax.tree_utils.tree_get_all_with_path(opt_state, name)
