"""Every dispatch backend against the dense oracle, in outputs and gradients (fp32, 1e-5)."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexolmo_jax.model import dispatch as D
from flexolmo_jax.model.moe import route

SPARSE = ["dropless", "ragged", "capacity", "megablox"]


def make_case(seed, t=48, d=32, f=48, e=4, k=2, skew=0.0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 5)
  x = jax.random.normal(ks[0], (t, d))
  w = {"w_gate": jax.random.normal(ks[1], (e, d, f)) / math.sqrt(d),
       "w_up": jax.random.normal(ks[2], (e, d, f)) / math.sqrt(d),
       "w_down": jax.random.normal(ks[3], (e, f, d)) / math.sqrt(f)}
  router = jax.random.normal(ks[4], (e, d))
  router = router.at[0].add(skew)  # skew > 0 sends most tokens to expert 0 (imbalanced groups)
  return x, w, router, k


def moe_out(backend, x, w, router, k, **kw):
  routing = route(x @ jnp.eye(x.shape[1]), router, k)
  y, stats = D.dispatch(backend, x, routing.weights_tk, routing.experts_tk, w["w_gate"], w["w_up"],
                        w["w_down"], **kw)
  return y, stats


def outputs_loss_and_grads(backend, x, w, router, k, **kw):
  """``((y, stats), loss, grads)``: the outputs come with the gradients, one program for both."""
  def loss(x, w, router):
    y, stats = moe_out(backend, x, w, router, k, **kw)
    return jnp.sum(jnp.sin(y) * jnp.arange(y.size).reshape(y.shape) / y.size), (y, stats)
  (l, out), g = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, w, router)
  return out, l, g


def extra_kwargs(backend):
  return {"capacity_factor": 100.0} if backend == "capacity" else {}


@functools.lru_cache(maxsize=None)
def oracle_case(e, k, skew):
  """(case, the dense oracle's output and stats, its loss and gradients): computed once for the
  four backends compared with it."""
  x, w, router, k = make_case(e * 10 + k, e=e, k=k, skew=skew)
  out, l, g = jax.jit(lambda x, w, r: outputs_loss_and_grads("dense", x, w, r, k))(x, w, router)
  return (x, w, router, k), out, (l, g)


@pytest.mark.parametrize("backend", SPARSE)
@pytest.mark.parametrize("e,k,skew", [(4, 2, 0.0), (8, 2, 0.0), (2, 2, 0.0), (1, 1, 0.0),
                                      (6, 3, 3.0), (16, 1, 0.0)])
def test_backend_matches_dense_oracle(backend, e, k, skew):
  (x, w, router, k), (y_ref, stats_ref), (l_ref, g_ref) = oracle_case(e, k, skew)
  kw = extra_kwargs(backend)
  (y, stats), l, g = jax.jit(
      lambda x, w, r: outputs_loss_and_grads(backend, x, w, r, k, **kw))(x, w, router)
  np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)
  assert float(stats.dropped_fraction) == 0.0
  assert int(stats.tokens_per_expert.sum()) == x.shape[0] * k

  np.testing.assert_allclose(l, l_ref, atol=1e-5, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  # The gradient reaches every expert that received a token.
  used = np.asarray(stats_ref.tokens_per_expert) > 0
  assert np.all(np.abs(np.asarray(g[1]["w_gate"])).sum(axis=(1, 2))[used] > 0)


@pytest.mark.parametrize("block", [1, 8, 16, 128])
def test_dropless_block_sizes(block):
  x, w, router, k = make_case(3, t=40, e=5, k=2, skew=2.0)
  y_ref, _ = jax.jit(lambda x: moe_out("dense", x, w, router, k))(x)
  y, _ = jax.jit(lambda x: moe_out("dropless", x, w, router, k, block_size=block))(x)
  np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)


def test_automatic_block_size_per_platform():
  """A/(4E) rounded down to a power of two, within [8, the platform's largest] (bench/RESULTS.md:
  256 on CPU, 2048 on accelerators); the default platform is JAX's."""
  assert D.block_size_for(32768, 8, platform="gpu") == 1024
  assert D.block_size_for(32768, 2, platform="gpu") == 2048
  assert D.block_size_for(32768, 8, platform="tpu") == 1024
  assert D.block_size_for(32768, 8, platform="cpu") == 256
  assert D.block_size_for(32768, 8) == D.block_size_for(32768, 8, platform=jax.default_backend())
  assert D.block_size_for(100, 16, platform="gpu") == 8
  assert D.block_size_for(32768, 8, requested=64, platform="gpu") == 64


def naive_capacity(experts_tk, e, c):
  """Python reference of GShard capacity: first choices first, then token order."""
  t, k = experts_tk.shape
  fill = [0] * e
  keep = np.zeros((t, k), bool)
  for j in range(k):
    for i in range(t):
      ex = int(experts_tk[i, j])
      if fill[ex] < c:
        fill[ex] += 1
        keep[i, j] = True
  return keep


@pytest.mark.parametrize("cf", [0.25, 0.5, 1.0])
def test_capacity_reports_the_drops_it_makes(cf):
  x, w, router, k = make_case(7, t=64, e=4, k=2, skew=1.5)
  routing = route(x, router, k)
  y, stats = D.dispatch("capacity", x, routing.weights_tk, routing.experts_tk, w["w_gate"],
                        w["w_up"], w["w_down"], capacity_factor=cf)
  c = D.expert_capacity(64, k, 4, cf)
  keep = naive_capacity(np.asarray(routing.experts_tk), 4, c)
  assert float(stats.dropped_fraction) == pytest.approx(1.0 - keep.mean(), abs=1e-7)
  assert keep.mean() < 1.0
  # The output equals the oracle with the dropped assignments' weights set to zero.
  y_ref, _ = D.dispatch("dense", x, routing.weights_tk * keep, routing.experts_tk, w["w_gate"],
                        w["w_up"], w["w_down"])
  np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)


def test_sorted_layout_is_a_padded_permutation():
  experts = jnp.asarray([[2, 0], [2, 1], [0, 2], [2, 0], [1, 2]], jnp.int32)
  lay = D.sorted_layout(experts, 3, block=2)
  rows = np.asarray(lay.row_of_assignment).reshape(-1)
  assert len(set(rows.tolist())) == rows.size            # injective
  blocks = np.asarray(lay.block_expert)[rows // 2]
  np.testing.assert_array_equal(blocks, np.asarray(experts).reshape(-1))   # right expert's block
  np.testing.assert_array_equal(lay.group_sizes, [3, 2, 5])
  assert int(lay.num_used_blocks) == 2 + 1 + 3             # ceil(3/2) + ceil(2/2) + ceil(5/2)


def test_unknown_backend_is_named():
  x, w, router, k = make_case(0)
  routing = route(x, router, k)
  with pytest.raises(ValueError, match="'sparse_magic'.*dense, capacity, dropless"):
    D.dispatch("sparse_magic", x, routing.weights_tk, routing.experts_tk, w["w_gate"], w["w_up"],
               w["w_down"])


def test_bf16_backends_close_to_fp32_oracle():
  x, w, router, k = make_case(11, e=4, k=2)
  y_ref, _ = jax.jit(lambda x: moe_out("dense", x, w, router, k))(x)
  bw = jax.tree.map(lambda a: a.astype(jnp.bfloat16), w)
  for backend in SPARSE:
    y, _ = jax.jit(lambda x: moe_out(backend, x, bw, router, k, **extra_kwargs(backend)))(
        x.astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), y_ref, atol=0.05, rtol=0.05)


def test_auto_is_megablox_on_tpu_where_the_tiles_divide_else_dropless():
  assert D.resolve("auto", 4096, 11008, platform="tpu") == "megablox"
  assert D.resolve("auto", 64, 128, platform="tpu") == "dropless"
  assert D.resolve("auto", 4096, 11008, platform="gpu") == "dropless"
  assert D.resolve("auto", 4096, 11008, platform="cpu") == "dropless"
  assert D.resolve("ragged", 4096, 11008, platform="tpu") == "ragged"
  # On this host auto is dropless: the same outputs, bit for bit.
  x, w, router, k = make_case(3)
  np.testing.assert_array_equal(moe_out("auto", x, w, router, k)[0],
                                moe_out("dropless", x, w, router, k)[0])


def test_alltoall_with_experts_that_do_not_divide_the_expert_axis():
  """3 experts over an expert axis of 2 (padded with a zero expert nobody routes to): outputs,
  gradients and counts equal the dense oracle's."""
  from flexolmo_jax import sharding
  from flexolmo_jax.config import MeshConfig

  mesh, rules = sharding.make_mesh(MeshConfig(data=4, expert=2)), sharding.ShardingRules()
  x, w, router, k = make_case(5, t=64, e=3, k=2)
  traced = lambda f: sharding.jit_sharded(f, mesh, rules, in_shardings=None, out_shardings=None)
  (y, stats), l, g = traced(
      lambda x, w, r: outputs_loss_and_grads("alltoall", x, w, r, k))(x, w, router)
  (y_ref, stats_ref), l_ref, g_ref = jax.jit(
      lambda x, w, r: outputs_loss_and_grads("dense", x, w, r, k))(x, w, router)
  np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(stats.tokens_per_expert, stats_ref.tokens_per_expert)
  np.testing.assert_allclose(l, l_ref, atol=1e-5, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_ragged_takes_another_grouped_matmul_with_the_same_signature():
  """``ragged_dispatch(ragged_dot=...)`` (how the benchmark times tokamax's kernels) runs the
  three projections through the given function, with the same result."""
  (x, w, router, k), (y_ref, _), _ = oracle_case(4, 2, 0.0)
  calls = []

  def counted(lhs, rhs, group_sizes):
    calls.append(rhs.shape)
    return jax.lax.ragged_dot(lhs, rhs, group_sizes)

  routing = route(x @ jnp.eye(x.shape[1]), router, k)
  y, _ = D.ragged_dispatch(x, routing.weights_tk, routing.experts_tk, w["w_gate"], w["w_up"],
                           w["w_down"], ragged_dot=counted)
  assert calls == [w["w_gate"].shape, w["w_up"].shape, w["w_down"].shape]
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
