"""Shared test helpers: tiny configs, Hugging Face reference models built on CPU (no hub), and
comparisons of saved directories."""
import filecmp
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from flexolmo_jax.checkpoint import store
from flexolmo_jax.config import load_model_config
from flexolmo_jax.convert import hf
from flexolmo_jax.model.transformer import Transformer, pure_model


def tiny(**changes):
  return load_model_config("tiny", **changes)


def tokens(cfg, batch=2, length=16, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randint(0, cfg.vocab_size, (batch, length)))


def spread_router(model, scale=1.0, seed=0):
  """Give the router rows (and norms) non-trivial values so routing differs across tokens."""
  state = nnx.state(model, nnx.Param)
  key = jax.random.PRNGKey(seed)
  for path, var in nnx.to_flat_state(state):
    key, sub = jax.random.split(key)
    if path[-1] == "router_embedding":
      var[...] = jax.random.normal(sub, var[...].shape, var[...].dtype) * scale
    elif path[-1] == "weight":  # norm weights: away from 1 so a wrong norm shows up
      var[...] = 1.0 + 0.2 * jax.random.normal(sub, var[...].shape, var[...].dtype)
  nnx.update(model, state)
  return model


def hf_reference(kind, *, seed=0, **overrides):
  """(torch model, our ModelConfig, our Transformer with the same weights)."""
  from transformers import FlexOlmoConfig, FlexOlmoForCausalLM, Olmo2Config, Olmo2ForCausalLM

  base = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              pad_token_id=0, eos_token_id=1, rope_parameters={"rope_theta": 500000.0,
                                                               "rope_type": "default"})
  base.update(overrides)
  torch.manual_seed(seed)
  if kind == "flex_olmo":
    base.setdefault("num_experts", 4)
    base.setdefault("num_experts_per_tok", 2)
    ref = FlexOlmoForCausalLM(FlexOlmoConfig(**base)).eval()
  else:
    ref = Olmo2ForCausalLM(Olmo2Config(**base)).eval()
  with torch.no_grad():
    for name, p in ref.named_parameters():
      if "norm" in name:
        p.normal_(1.0, 0.2)
      elif "mlp.gate.weight" in name:
        p.normal_(0.0, 1.0)
  cfg = hf.config_from_hf(ref.config.to_dict())
  model = Transformer(cfg, nnx.Rngs(0))
  hf.load_into(model, hf.params_from_hf(ref.state_dict(), cfg))
  return ref, cfg, model


def hf_logits(ref, toks):
  with torch.no_grad():
    return ref(torch.as_tensor(np.array(toks))).logits.float().numpy()


def lm_batch(vocab_size, batch=8, length=32, seed=0):
  """A packed LM batch like the seqio stream's: two segments per row, the tail padded."""
  rs = np.random.RandomState(seed)
  toks = rs.randint(3, vocab_size, (batch, length + 1)).astype(np.int32)
  cut, pad = length // 3, length - 4
  seg = np.where(np.arange(length) < cut, 1, 2)[None].repeat(batch, 0).astype(np.int32)
  seg[:, pad:] = 0
  pos = np.where(np.arange(length) < cut, np.arange(length), np.arange(length) - cut)
  pos = np.where(seg > 0, pos[None], 0).astype(np.int32)
  return {"decoder_input_tokens": np.where(seg > 0, toks[:, :-1], 0),
          "decoder_target_tokens": np.where(seg > 0, toks[:, 1:], 0),
          "decoder_segment_ids": seg, "decoder_positions": pos,
          "decoder_loss_weights": (seg > 0).astype(np.float32)}


def synthetic_stream(vocab_size, batch=8, length=32, seed=0):
  """``start -> iterator`` over deterministic batches (batch i depends only on seed and i)."""
  def make(start):
    i = start
    while True:
      yield lm_batch(vocab_size, batch, length, seed * 100_003 + i)
      i += 1
  return make


def run_cli(argv, timeout=1200, cwd=None, env=None):
  """``flexolmo ARGV`` in its own process (one CPU device), as a user runs it, from ``cwd``."""
  import os
  import subprocess
  import sys

  return subprocess.run([sys.executable, "-m", "flexolmo_jax.cli", *argv],
                        env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})},
                        capture_output=True, text=True, timeout=timeout, cwd=cwd)


def save_random_public(path, cfg=None, seed=0):
  """A randomly initialized public model saved as ``pretrain`` would (byte vocabulary)."""
  from flexolmo_jax.checkpoint import store
  from flexolmo_jax.data import vocabularies
  from flexolmo_jax.model.transformer import pure_model

  cfg = cfg or tiny()
  params = pure_model(cfg).init(seed)
  store.save(str(path), params, {
      "kind": "public", "config": store.config_to_json(cfg),
      "vocabulary": {"spec": "byte", **vocabularies.identity("byte")},
      "fingerprint": store.fingerprint(params), "data_card": {}})
  return str(path), cfg, params


def logits_of(cfg, params, batch):
  logits, _ = jax.jit(lambda p, b: pure_model(cfg)(p, b))(params, batch)
  return np.asarray(logits)


def tree_files(path):
  return sorted(os.path.relpath(os.path.join(r, f), path) for r, _, fs in os.walk(path) for f in fs)


def same_tree(a, b):
  files = tree_files(a)
  assert files == tree_files(b)
  _, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
  return not mismatch and not errors


def edited_copy(src, dst, edit):
  shutil.copytree(src, dst)
  path = os.path.join(dst, store.MANIFEST)
  manifest = json.load(open(path))
  edit(manifest)
  json.dump(manifest, open(path, "w"))
  return str(dst)


def data_file(artifact):
  return max((os.path.join(r, f) for r, _, fs in os.walk(os.path.join(artifact, "params"))
              for f in fs), key=os.path.getsize)
