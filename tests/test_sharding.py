"""Sharded forward and gradients on a fake 8-device CPU mesh equal the 1-device result."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from flexolmo_jax import sharding
from flexolmo_jax.config import MeshConfig
from flexolmo_jax.model.transformer import Transformer
from tests.helpers import spread_router, tiny, tokens


def loss_fn(graphdef, state, toks):
  logits, aux = nnx.merge(graphdef, state)(toks)
  logp = jax.nn.log_softmax(logits[:, :-1])
  nll = -jnp.take_along_axis(logp, toks[:, 1:, None], axis=-1)
  return jnp.mean(nll) + aux.moe_loss, logits


def run(model, toks, mesh, rules):
  graphdef, state, shardings = sharding.shard_model(model, mesh, rules)
  batch = sharding.batch_sharding(mesh, rules, toks.shape)
  logits_sharding = NamedSharding(mesh, rules.spec(("batch", "length", "vocab")))
  step = sharding.jit_sharded(
      lambda s, t: jax.value_and_grad(lambda s: loss_fn(graphdef, s, t), has_aux=True)(s),
      mesh, rules, in_shardings=(shardings, batch),
      out_shardings=((NamedSharding(mesh, P()), logits_sharding), shardings))
  (loss, logits), grads = step(state, jax.device_put(toks, batch))
  return state, loss, logits, grads


def case(backend):
  """The model (the same weights in every call) and its tokens."""
  cfg = tiny(experts=("public", "code", "math", "news"), top_k=2, dispatch=backend)
  return spread_router(Transformer(cfg, nnx.Rngs(0))), tokens(cfg, batch=8, length=16)


@functools.lru_cache(maxsize=None)
def one_device(backend):
  """The 1-device loss, logits and gradients: computed once for the three meshes."""
  model, toks = case(backend)
  one = sharding.make_mesh(MeshConfig(), devices=jax.devices()[:1])
  _, loss, logits, grads = run(model, toks, one, sharding.ShardingRules())
  return jax.tree.map(np.asarray, (loss, logits, grads))


@pytest.mark.parametrize("backend", ["dropless", "dense"])
@pytest.mark.parametrize("mesh_cfg", [MeshConfig(data=2, fsdp=2, tensor=2),
                                      MeshConfig(fsdp=2, expert=4),
                                      MeshConfig(data=2, tensor=2, expert=2)],
                         ids=["data2-fsdp2-tensor2", "fsdp2-expert4", "data2-tensor2-expert2"])
def test_sharded_equals_single_device(mesh_cfg, backend):
  assert len(jax.devices()) == 8
  model, toks = case(backend)
  rules = sharding.ShardingRules()
  loss1, logits1, grads1 = one_device(backend)
  mesh = sharding.make_mesh(mesh_cfg)
  state8, loss8, logits8, grads8 = run(model, toks, mesh, rules)

  np.testing.assert_allclose(loss8, loss1, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(logits8, logits1, atol=1e-5, rtol=0)
  for a, b in zip(jax.tree.leaves(grads8), jax.tree.leaves(grads1)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)

  # The parameters (and their gradients) are laid out as the rules say.
  blocks = state8["blocks"]
  expected = {
      ("ffn", "w_gate"): P(None, "expert", "fsdp", "tensor"),
      ("ffn", "w_down"): P(None, "expert", "tensor", "fsdp"),
      ("ffn", "router_embedding"): P(None, "expert", "fsdp"),
      ("attn", "q_proj"): P(None, "fsdp", "tensor", None),
      ("attn", "o_proj"): P(None, "tensor", None, "fsdp"),
      ("post_attention_norm", "weight"): P(None, "fsdp"),
  }
  for (mod, name), spec in expected.items():
    arr = blocks[mod][name][...]
    assert arr.sharding.spec == spec, (mod, name, arr.sharding.spec)
    shard_shape = arr.sharding.shard_shape(arr.shape)
    for dim, axes in enumerate(spec):
      if axes is not None:
        assert shard_shape[dim] == arr.shape[dim] // mesh.shape[axes]
    assert grads8["blocks"][mod][name][...].sharding.spec == spec
  assert state8["embed"][...].sharding.spec == P("tensor", "fsdp")
  assert state8["lm_head"][...].sharding.spec == P("fsdp", "tensor")
  assert logits8.sharding.spec == P(("data", "fsdp", "expert"), None, "tensor")


def test_mesh_that_does_not_divide_is_named():
  cfg = tiny(experts=("public", "a", "b"), top_k=2)
  model = Transformer(cfg, nnx.Rngs(0))
  mesh = sharding.make_mesh(MeshConfig(fsdp=2, expert=4))
  with pytest.raises(ValueError, match=r"blocks\.ffn\.router_embedding.*size 3.*\('expert',\)"):
    sharding.shard_model(model, mesh, sharding.ShardingRules())
  with pytest.raises(ValueError, match=r"batch of shape \(4, 16\).*dimension 0"):
    sharding.batch_sharding(mesh, sharding.ShardingRules(), (4, 16))


def test_mesh_config_errors():
  with pytest.raises(ValueError, match="mesh has 4 devices but 8"):
    MeshConfig(data=2, fsdp=2).shape(8)
  with pytest.raises(ValueError, match="not divisible"):
    MeshConfig(data=3, fsdp=-1).shape(8)
  assert MeshConfig(data=2, fsdp=-1).shape(8) == {"data": 2, "fsdp": 4, "tensor": 1, "expert": 1}


@pytest.mark.parametrize("changes", [{"dispatch": "megablox"}, {"attention": "splash"}],
                         ids=["megablox", "splash"])
def test_pallas_kernels_under_shard_map_equal_single_device(changes):
  """The Pallas kernels (interpret mode here) run per device under shard_map on the mesh; the
  loss, logits and gradients are those of one device running the reference paths."""
  cfg = tiny(experts=("public", "code", "math", "news"), top_k=2, dispatch="dense",
             attention="reference")
  model = spread_router(Transformer(cfg, nnx.Rngs(0)))
  toks = tokens(cfg, batch=4, length=128)
  rules = sharding.ShardingRules()
  _, loss1, logits1, grads1 = run(model, toks, sharding.make_mesh(
      MeshConfig(), devices=jax.devices()[:1]), rules)
  kernel = Transformer(cfg.replace(**changes), nnx.Rngs(0))
  nnx.update(kernel, nnx.state(model, nnx.Param))
  _, loss8, logits8, grads8 = run(kernel, toks, sharding.make_mesh(
      MeshConfig(data=2, fsdp=2, tensor=2)), rules)
  np.testing.assert_allclose(loss8, loss1, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(logits8, logits1, atol=1e-4, rtol=0)
  for a, b in zip(jax.tree.leaves(grads8), jax.tree.leaves(grads1)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_alltoall_expert_parallel_equals_the_gspmd_path():
  """Tokens sent to their experts' devices with all_to_all and back (one expert per device of
  the expert axis): the loss, logits and every gradient equal the GSPMD dropless path."""
  model, toks = case("dropless")
  rules = sharding.ShardingRules()
  mesh = sharding.make_mesh(MeshConfig(fsdp=2, expert=4))
  _, loss_g, logits_g, grads_g = run(model, toks, mesh, rules)
  ep = Transformer(model.cfg.replace(dispatch="alltoall"), nnx.Rngs(0))
  nnx.update(ep, nnx.state(model, nnx.Param))
  _, loss_a, logits_a, grads_a = run(ep, toks, mesh, rules)
  np.testing.assert_allclose(loss_a, loss_g, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(logits_a, logits_g, atol=1e-5, rtol=0)
  for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_g)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_experts_padded_to_the_expert_axis_equal_the_model_as_stored():
  """3 experts over an expert axis of 4 (a merged 7-expert model over 8 devices, small): one
  zero expert pads the stacks, the all-to-all dispatch keeps each expert's weights whole on its
  shard, and loss, logits and gradients equal the unpadded model on one device; the zero
  expert gets no gradient."""
  from flexolmo_jax.model import moe

  rules = sharding.ShardingRules()
  cfg = tiny(experts=("public", "code", "math"), top_k=2, dispatch="dropless")
  model, toks = spread_router(Transformer(cfg, nnx.Rngs(0))), tokens(cfg, batch=8, length=16)
  one = sharding.make_mesh(MeshConfig(), devices=jax.devices()[:1])
  _, loss1, logits1, grads1 = run(model, toks, one, rules)
  mesh = sharding.make_mesh(MeshConfig(fsdp=2, expert=4))
  padded_cfg = moe.rows_for_mesh(cfg.replace(dispatch="alltoall"), mesh, rules)
  assert padded_cfg.num_expert_rows == 4 and padded_cfg.experts == cfg.experts
  padded = Transformer(padded_cfg, nnx.Rngs(1))
  state = nnx.state(padded, nnx.Param)
  state.replace_by_pure_dict(moe.pad_rows(nnx.state(model, nnx.Param).to_pure_dict(), 4))
  nnx.update(padded, state)
  state, loss, logits, grads = run(padded, toks, mesh, rules)
  assert state["blocks"]["ffn"]["w_gate"].sharding.spec == P(None, "expert", None, "tensor")
  np.testing.assert_allclose(loss, loss1, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(logits, logits1, atol=1e-5, rtol=0)
  expected = moe.pad_rows(jax.tree.map(np.asarray, grads1.to_pure_dict()), 4)
  got = jax.tree.map(np.asarray, grads.to_pure_dict())
  assert jax.tree.structure(got) == jax.tree.structure(expected)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
