"""The model against Hugging Face transformers and against itself (opt-out, dense, scan, packing)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from flexolmo_jax.model.transformer import Transformer
from tests.helpers import hf_logits, hf_reference, spread_router, tiny, tokens


@pytest.mark.parametrize("backend", ["dropless", "dense", "capacity", "ragged"])
def test_flexolmo_matches_transformers(backend):
  ref, cfg, model = hf_reference("flex_olmo")
  assert cfg.experts == ("public", "expert_1", "expert_2", "expert_3") and cfg.top_k == 2
  model = Transformer(cfg.replace(dispatch=backend, capacity_factor=8.0), nnx.Rngs(1))
  nnx.update(model, nnx.state(hf_reference("flex_olmo")[2], nnx.Param))
  toks = tokens(cfg, batch=2, length=24)
  logits, aux = model(toks)
  np.testing.assert_allclose(logits, hf_logits(ref, toks), atol=1e-4, rtol=0)
  # Routing is genuinely sparse and spread in this test: every expert gets tokens.
  assert np.all(np.asarray(aux.expert_share) > 0.05)


def test_dense_olmo2_matches_transformers():
  ref, cfg, model = hf_reference("olmo2")
  assert not cfg.is_moe
  toks = tokens(cfg, batch=2, length=24)
  np.testing.assert_allclose(model(toks)[0], hf_logits(ref, toks), atol=1e-4, rtol=0)


def test_load_balance_loss_matches_transformers():
  from transformers.models.flex_olmo.modeling_flex_olmo import load_balancing_loss_func
  ref, cfg, model = hf_reference("flex_olmo")
  toks = tokens(cfg, batch=2, length=24)
  with torch.no_grad():
    out = ref(torch.as_tensor(np.array(toks)), output_router_logits=True)
  expected = load_balancing_loss_func(out.router_logits, cfg.num_experts, cfg.top_k)
  _, aux = model(toks)
  np.testing.assert_allclose(aux.load_balance_loss, expected.item(), rtol=1e-5)
  # z-loss: mean over layers of mean_t logsumexp(logits)^2, from the same router logits.
  z = np.mean([np.mean(torch.logsumexp(l.float(), -1).numpy() ** 2) for l in out.router_logits])
  np.testing.assert_allclose(aux.router_z_loss, z, rtol=1e-5)
  np.testing.assert_allclose(aux.moe_loss, cfg.router_z_loss_weight * z, rtol=1e-5)


def sliced_model(model, keep):
  """A model built without the dropped experts, holding the kept experts' exact weights."""
  cfg = model.cfg
  index = [cfg.experts.index(n) for n in keep]
  small = Transformer(cfg.replace(experts=tuple(keep), top_k=min(cfg.top_k, len(keep))),
                      nnx.Rngs(5))
  state = nnx.state(model, nnx.Param)
  flat = {p: v[...] for p, v in nnx.to_flat_state(state)}
  small_state = nnx.state(small, nnx.Param)
  for path, var in nnx.to_flat_state(small_state):
    value = flat[path]
    if "expert" in var.get_metadata()["axes"]:
      axis = var.get_metadata()["axes"].index("expert")
      value = jnp.take(value, jnp.asarray(index), axis=axis)
    var[...] = value
  nnx.update(small, small_state)
  return small


@pytest.mark.parametrize("backend", ["dropless", "dense"])
def test_opt_out_equals_model_built_without_the_expert(backend):
  cfg = tiny(experts=("public", "code", "math", "news"), top_k=2, dispatch=backend,
             negative_bias=True)
  model = spread_router(Transformer(cfg, nnx.Rngs(0)))
  toks = tokens(cfg)
  opted_out, _ = model(toks, experts=["public", "code", "news"])
  built_without, _ = sliced_model(model, ["public", "code", "news"])(toks)
  np.testing.assert_array_equal(opted_out, built_without)
  # Names, not positions, decide: the order of the selection does not matter.
  np.testing.assert_array_equal(model(toks, experts=["news", "public", "code"])[0], opted_out)
  # And the opt-out really changes the model (math was being used).
  assert np.abs(np.asarray(model(toks)[0] - opted_out)).max() > 1e-4


def test_one_expert_moe_equals_dense():
  """A one-expert MoE computes the dense model: the router's softmax over one logit is exactly 1,
  so the layer is 1.0 * FFN(x). The two are different compiled programs, though (the MoE's FFN
  runs through dispatch, whose matmuls XLA may block and accumulate in another order), so they
  agree to float rounding, not bitwise: 3.6e-7 apart on one x86_64 machine, 0 on another. The
  bitwise claims of the suite (opt-out, merge, selection by name) compare the same program on the
  same parameters, which is equal by construction on any machine."""
  dense_cfg = tiny()
  dense = spread_router(Transformer(dense_cfg, nnx.Rngs(0)))
  for backend in ["dense", "dropless"]:
    moe = Transformer(dense_cfg.replace(experts=("public",), top_k=1, dispatch=backend),
                      nnx.Rngs(1))
    state = nnx.state(moe, nnx.Param)
    dense_flat = {p: v[...] for p, v in nnx.to_flat_state(nnx.state(dense, nnx.Param))}
    for path, var in nnx.to_flat_state(state):
      if path[-1] in ("w_gate", "w_up", "w_down"):
        src = {"w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"}[path[-1]]
        var[...] = dense_flat[path[:-1] + (src,)][:, None]
      elif path[-1] == "router_embedding":
        var[...] = jax.random.normal(jax.random.PRNGKey(3), var[...].shape)
      else:
        var[...] = dense_flat[path]
    nnx.update(moe, state)
    toks = tokens(dense_cfg)
    logits, aux = moe(toks)
    np.testing.assert_allclose(logits, dense(toks)[0], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(aux.expert_share, [1.0])     # every token to the one expert


def test_scanned_equals_unrolled_and_remat():
  cfg = tiny(experts=("public", "a", "b"), top_k=2)
  model = spread_router(Transformer(cfg, nnx.Rngs(0)))
  toks = tokens(cfg)
  ref = model(toks)[0]
  for changes in ({"scan_layers": False}, {"remat": True}):
    other = Transformer(cfg.replace(**changes), nnx.Rngs(9))
    nnx.update(other, nnx.state(model, nnx.Param))
    np.testing.assert_allclose(other(toks)[0], ref, atol=1e-5, rtol=0)


def test_packed_segments_do_not_attend_across():
  cfg = tiny()
  model = spread_router(Transformer(cfg, nnx.Rngs(0)))
  a, b = tokens(cfg, 1, 10, seed=1), tokens(cfg, 1, 6, seed=2)
  packed = jnp.concatenate([a, b], axis=1)
  seg = jnp.asarray([[1] * 10 + [2] * 6])
  pos = jnp.asarray([list(range(10)) + list(range(6))])
  out, _ = model(packed, positions_bt=pos, segment_ids_bt=seg)
  np.testing.assert_allclose(out[:, :10], model(a)[0], atol=1e-5, rtol=0)
  np.testing.assert_allclose(out[:, 10:], model(b)[0], atol=1e-5, rtol=0)


def test_negative_bias_only_on_non_public_experts():
  cfg = tiny(experts=("public", "code"), top_k=1, negative_bias=True)
  model = spread_router(Transformer(cfg, nnx.Rngs(0)))
  toks = tokens(cfg, 2, 32)
  share = np.asarray(model(toks)[1].expert_share)
  assert 0 < share[1] < 1
  # A very negative bias on the new expert removes it from top-1 routing entirely.
  model.blocks.ffn.negative_bias[...] = jnp.asarray([[0.0, -1e4]] * cfg.n_layers)
  np.testing.assert_array_equal(model(toks)[1].expert_share, [1.0, 0.0])
  # A positive bias is clipped at 0 (min(b, 0)); a bias on `public` is ignored.
  model.blocks.ffn.negative_bias[...] = jnp.asarray([[-1e4, 5.0]] * cfg.n_layers)
  np.testing.assert_allclose(model(toks)[1].expert_share, share)


def test_bf16_model_runs_close_to_fp32():
  cfg = tiny(experts=("public", "a", "b", "c"), top_k=2)
  model = spread_router(Transformer(cfg, nnx.Rngs(0)))
  toks = tokens(cfg)
  ref = model(toks)[0]
  bf = Transformer(cfg.replace(dtype="bfloat16", param_dtype="bfloat16"), nnx.Rngs(0))
  nnx.update(bf, jax.tree.map(lambda a: a.astype(jnp.bfloat16), nnx.state(model, nnx.Param)))
  assert bf.blocks.ffn.w_gate[...].dtype == jnp.bfloat16
  out = bf(toks)[0]
  assert out.dtype == jnp.float32
  assert np.abs(np.asarray(out - ref)).max() < 0.1 * np.abs(np.asarray(ref)).max()


def test_gradients_flow_through_every_backend():
  base = tiny(experts=("public", "a", "b", "c"), top_k=2)
  model = spread_router(Transformer(base.replace(dispatch="dense"), nnx.Rngs(0)))
  toks = tokens(base)
  grads = {}
  for backend in ["dense", "dropless", "ragged", "capacity"]:
    m = Transformer(base.replace(dispatch=backend, capacity_factor=8.0), nnx.Rngs(0))
    nnx.update(m, nnx.state(model, nnx.Param))
    graphdef, state = nnx.split(m, nnx.Param)
    def loss(state, graphdef=graphdef):
      logits, aux = nnx.merge(graphdef, state)(toks)
      return jnp.mean(jax.nn.log_softmax(logits)[..., 0]) + aux.moe_loss
    grads[backend] = jax.jit(jax.grad(loss))(state)
  for backend in ["dropless", "ragged", "capacity"]:
    for a, b in zip(jax.tree.leaves(grads[backend]), jax.tree.leaves(grads["dense"])):
      np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  assert np.abs(np.asarray(grads["dense"]["blocks"]["ffn"]["router_embedding"][...])).max() > 0


def test_layers_are_scanned_into_one_compiled_body():
  """A 32-layer model lowers to the same program size as a 2-layer one (one scanned body)."""
  def program_size(n_layers, scan):
    cfg = tiny(n_layers=n_layers, experts=("public", "a"), top_k=2, scan_layers=scan)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))
    toks = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    fn = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0])
    return len(fn.lower(state, toks).as_text().splitlines())

  two, thirty_two = program_size(2, True), program_size(32, True)
  assert thirty_two <= 1.02 * two, (two, thirty_two)
  assert program_size(8, False) > 3 * two   # unrolled layers would grow with depth


def test_expert_keep_mask_equals_opting_out_per_sequence():
  """Router tuning's expert dropout: a row that drops expert "b" computes exactly what the
  model with "b" opted out computes, in every layer; the other rows are untouched."""
  cfg = tiny(experts=("public", "a", "b", "c"), top_k=4, negative_bias=True,
             top_k_policy="clamp")
  model = spread_router(Transformer(cfg, nnx.Rngs(0)))
  model.blocks.ffn.negative_bias[...] = jnp.full((cfg.n_layers, 4), -0.5)
  toks = tokens(cfg, batch=3, length=16)
  keep = np.ones((3, 16, 4), bool)
  keep[1, :, 2] = False                     # row 1 without "b"
  keep[2, :, 1:] = False                    # row 2 with public alone
  out = model(toks, expert_keep_bte=jnp.asarray(keep))[0]
  np.testing.assert_allclose(out[0], model(toks)[0][0], atol=1e-6, rtol=0)
  np.testing.assert_allclose(out[1], model(toks, experts=("public", "a", "c"))[0][1],
                             atol=1e-5, rtol=0)
  np.testing.assert_allclose(out[2], model(toks, experts=("public",))[0][2], atol=1e-5, rtol=0)
  assert not np.allclose(out[1], out[0], atol=1e-3)
  with pytest.raises(ValueError, match=r"expected \(3, 16, 4\)"):
    model(toks, expert_keep_bte=jnp.asarray(keep[..., :3]))


def test_remat_policies_give_the_same_gradients():
  """Every policy recomputes what it did not save; the gradients are those of saving everything.
  The older boolean setting still reads (True is "full")."""
  from flexolmo_jax.model.transformer import pure_model
  cfg = tiny(experts=("public", "a"), top_k=1)
  toks = tokens(cfg)
  params = pure_model(cfg).init(0)

  def grads(remat):
    loss = lambda p: jnp.mean(pure_model(cfg.replace(remat=remat))(p, toks)[0] ** 2)
    return jax.tree.leaves(jax.jit(jax.grad(loss))(params))

  want = grads("none")
  for policy in ("full", "dots", "dots_no_batch"):
    for a, b in zip(grads(policy), want):
      np.testing.assert_allclose(a, b, atol=1e-6, rtol=0, err_msg=policy)
  assert tiny(remat=True).remat == "full" and tiny(remat=False).remat == "none"
  with pytest.raises(ValueError, match="choose from"):
    tiny(remat="some")
  with pytest.raises(ValueError, match="host memory"):
    grads("offload")


@pytest.mark.parametrize("contract, spec", [(1, "btd,dhk->bthk"), (2, "bthk,hkd->btd")])
def test_project_is_the_einsum_in_outputs_and_gradients(contract, spec):
  """``layers.project`` (a 2-D matrix product over the tokens) against the einsum it replaces,
  with fp32 accumulation of bf16 operands as the lm head asks for."""
  from flexolmo_jax.model.layers import project

  kx, kw = jax.random.split(jax.random.key(3))
  x = jax.random.normal(kx, (2, 5, 6, 4) if contract == 2 else (2, 5, 12))
  w = jax.random.normal(kw, (6, 4, 12) if contract == 2 else (12, 3, 4))
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))
  ours = lambda x, w: project(x, w, contract=contract)
  theirs = lambda x, w: jnp.einsum(spec, x, w)
  np.testing.assert_allclose(ours(x, w), theirs(x, w), rtol=1e-5, atol=1e-5)
  for got, want in zip(jax.grad(loss(ours), (0, 1))(x, w), jax.grad(loss(theirs), (0, 1))(x, w)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  half = project(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), contract=contract,
                 preferred_element_type=jnp.float32)
  assert half.dtype == jnp.float32 and half.shape == theirs(x, w).shape
