"""Memory linear in the sequence length: the compiled `small` training step (blocked attention,
the CPU default) at 2048 and 8192 tokens, and at 8 x 1024 against this machine's memory."""
import jax
import pytest

from flexolmo_jax import sharding

pytestmark = pytest.mark.slow


def compiled_step_bytes(seq_len, batch=1, attention_impl="auto"):
  """(temporaries, arguments) of the compiled `small` pretraining step on one CPU device."""
  from flexolmo_jax.config import MeshConfig, load_model_config
  from flexolmo_jax.plan import programs
  from flexolmo_jax.train.loop import TrainConfig
  cfg = load_model_config("small", max_seq_len=seq_len, attention=attention_impl)
  mesh = sharding.make_mesh(MeshConfig(), devices=jax.devices()[:1])
  rules = sharding.ShardingRules()
  program = programs.build("pretrain", cfg, TrainConfig(batch_size=batch, seq_len=seq_len),
                           mesh, rules)
  with sharding.activate(mesh, rules):
    memory = program.fn.lower(*program.args).compile().memory_analysis()
  return memory.temp_size_in_bytes, memory.argument_size_in_bytes


def test_training_memory_is_linear_in_sequence_length():
  """Without remat: 4x the length needs at most 5x the temporaries (the [T, T] scores would
  need 16x), and `small` at 8 x 1024 fits this 24 GiB machine with room to spare."""
  short, _ = compiled_step_bytes(2048)
  long, _ = compiled_step_bytes(8192)
  assert long <= 5 * short, (long / short, short, long)
  temporaries, arguments = compiled_step_bytes(1024, batch=8)
  assert temporaries + 2 * arguments < 20 * 2**30, (temporaries, arguments)
