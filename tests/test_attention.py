"""Every attention implementation against the reference formula: outputs and gradients, packed
segments, causal masks, odd lengths, grouped-query heads, a KV cache."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flexolmo_jax import sharding
from flexolmo_jax.model import attention
from flexolmo_jax.model.transformer import Transformer, pure_model
from tests.helpers import tiny, tokens


def qkv(batch, t, heads, kv_heads, dim, s=None, seed=0):
  rng = np.random.default_rng(seed)
  s = s or t
  q = jnp.asarray(rng.normal(size=(batch, t, heads, dim)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(batch, s, kv_heads, dim)), jnp.float32) for _ in "kv")
  return q, k, v


def packed_mask(batch, t, seed=0):
  """Sorted random segment ids: several documents per row, of odd lengths, some of length 1."""
  seg = jnp.asarray(np.sort(np.random.default_rng(seed).integers(0, 5, (batch, t)), axis=1))
  return attention.Mask(seg, seg, jnp.int32(0))


def assert_same_as_reference(fn, q, k, v, mask, atol=1e-5):
  loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v, mask)) * jnp.linspace(0.1, 1, q.shape[-1]))
  np.testing.assert_allclose(jax.jit(fn)(q, k, v, mask), attention.reference(q, k, v, mask),
                             atol=atol, rtol=0)
  want = jax.jit(jax.grad(loss(attention.reference), argnums=(0, 1, 2)))(q, k, v)
  got = jax.jit(jax.grad(loss(fn), argnums=(0, 1, 2)))(q, k, v)
  for name, a, b in zip("qkv", got, want):
    np.testing.assert_allclose(a, b, atol=atol, rtol=0, err_msg=f"d{name}")


@pytest.mark.parametrize("t,block_q,block_k", [(37, 16, 8), (64, 16, 16), (50, 64, 16)])
def test_blocked_equals_reference_with_packed_segments(t, block_q, block_k):
  q, k, v = qkv(2, t, 4, 2, 8)
  blocked = lambda *a: attention.blocked(*a, block_q=block_q, block_k=block_k)
  assert_same_as_reference(blocked, q, k, v, packed_mask(2, t))


def test_blocked_equals_reference_over_a_kv_cache():
  """Queries continuing a cache at index 7 (prefill-like) and at 29 (one decoded token)."""
  for t, index in ((5, 7), (1, 29)):
    q, k, v = qkv(2, t, 4, 1, 8, s=40)
    mask = attention.Mask(jnp.ones((2, t), jnp.int32), jnp.ones((2, 40), jnp.int32),
                          jnp.int32(index))
    blocked = lambda *a: attention.blocked(*a, block_q=4, block_k=8)
    assert_same_as_reference(blocked, q, k, v, mask)


def test_one_block_is_the_reference_and_the_mask_is_causal():
  q, k, v = qkv(1, 6, 2, 2, 4)
  mask = attention.Mask(jnp.ones((1, 6), jnp.int32), jnp.ones((1, 6), jnp.int32), jnp.int32(0))
  np.testing.assert_array_equal(mask.dense()[0, 0], np.tril(np.ones((6, 6), bool)))
  out = attention.blocked(q, k, v, mask)
  # Token 0 sees only itself: its output is its own value, for every head of its group.
  np.testing.assert_allclose(out[0, 0], v[0, 0], atol=1e-6)


def test_fused_wrapper_equals_reference():
  """The cuDNN path's wrapper (layout, grouped heads, the mask) checked with XLA's kernel."""
  q, k, v = qkv(2, 33, 6, 2, 8)
  fused = lambda *a: attention.fused(*a, "xla")
  assert_same_as_reference(fused, q, k, v, packed_mask(2, 33))


def test_splash_kernel_in_interpret_mode_equals_reference():
  from flexolmo_jax.model import splash
  q, k, v = qkv(1, 128, 4, 2, 64)
  assert_same_as_reference(splash.attend, q, k, v, packed_mask(1, 128))
  with pytest.raises(ValueError, match="multiples of 128"):
    splash.attend(*qkv(1, 100, 2, 2, 64), packed_mask(1, 100))


def test_auto_picks_per_platform(monkeypatch):
  expect = {("cpu", False): "blocked", ("gpu", False): "cudnn", ("tpu", False): "splash",
            ("tpu", True): "blocked", ("gpu", True): "blocked"}
  for (where, cached), name in expect.items():
    monkeypatch.setattr(sharding, "platform", lambda where=where: where)
    assert attention.resolve("auto", 256, 256, cached, dtype=jnp.bfloat16) == name
  # cuDNN's kernel takes 16-bit inputs: fp32 on a GPU stays blocked.
  assert attention.resolve("auto", 256, 256, False, "gpu", jnp.float32) == "blocked"
  monkeypatch.setattr(sharding, "platform", lambda: "tpu")
  assert attention.resolve("auto", 200, 200, False) == "blocked"   # the TPU kernel tiles 128s
  assert attention.resolve("reference", 256, 256, False) == "reference"
  with pytest.raises(ValueError, match="choose from"):
    attention.resolve("flash", 8, 8, False)
  with pytest.raises(ValueError, match="attention='flash'"):
    Transformer(tiny(attention="flash"), nnx.Rngs(0))


def test_model_with_blocked_attention_equals_reference_model(monkeypatch):
  """The whole decoder, packed, over several blocks: logits and every parameter's gradient."""
  monkeypatch.setattr(attention, "BLOCK_Q", 16)
  monkeypatch.setattr(attention, "BLOCK_K", 8)
  cfg = tiny()
  toks = tokens(cfg, 2, 45)
  seg = np.asarray(packed_mask(2, 45).q_segments)
  pos = np.asarray([[np.sum(row[:i] == row[i]) for i in range(45)] for row in seg])
  params = pure_model(cfg).init(0)

  def loss(params, name):
    logits, _ = pure_model(cfg.replace(attention=name))(params, toks, positions_bt=pos,
                                                        segment_ids_bt=seg)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

  grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  (_, want), g_want = grad(params, "reference")
  (_, got), g_got = grad(params, "blocked")
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_got), jax.tree.leaves(g_want)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=jax.tree_util.keystr(path))

