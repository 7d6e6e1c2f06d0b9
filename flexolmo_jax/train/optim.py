"""AdamW with linear warm-up and cosine decay, global-norm clipping (docs/method.md §4).

The optimizer only ever sees the *trainable* tree: frozen parameters are a separate argument of
the step, so they have no optimizer state and get no update (docs/architecture.md, "Frozen means untouched").
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import optax

from flexolmo_jax.checkpoint.store import flatten


def schedule(learning_rate: float, steps: int, warmup_steps: int, final_lr_fraction: float):
  """0 -> lr linearly over ``warmup_steps``, then cosine to ``lr * final_lr_fraction`` at ``steps``."""
  warmup = min(warmup_steps, max(steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=learning_rate, warmup_steps=warmup,
      decay_steps=max(steps, warmup + 1), end_value=learning_rate * final_lr_fraction)


def decay_mask(params: Mapping[str, Any]):
  """Weight decay on weight matrices only: not on norms, biases or router rows."""
  def walk(tree, prefix=""):
    out = {}
    for key, value in tree.items():
      path = f"{prefix}/{key}"
      if isinstance(value, Mapping):
        out[key] = walk(value, path)
      else:
        out[key] = not any(word in path for word in ("norm", "bias", "router"))
    return out
  return walk(params)


def router_mask(params: Mapping[str, Any]):
  """True at router rows and negative biases (every leaf whose path names a router or a bias
  of the routing)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: any(word in jax.tree_util.keystr(path)
                          for word in ("router", "negative_bias")), dict(params))


def adamw(cfg, params: Mapping[str, Any]) -> optax.GradientTransformation:
  """``cfg`` is a TrainConfig; ``params`` the trainable tree (for the decay mask). The router's
  updates are scaled by ``cfg.router_lr_scale``."""
  lr = schedule(cfg.learning_rate, cfg.steps, cfg.warmup_steps, cfg.final_lr_fraction)
  scale = cfg.router_lr_scale
  return optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity(),
      optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                  mask=decay_mask(params)),
      optax.masked(optax.scale(scale), router_mask(params)) if scale != 1.0
      else optax.identity())


def state_shardings(opt_state, param_shardings, replicated):
  """Shardings of an optimizer state (concrete or abstract): each subtree shaped like the
  parameters (Adam's moments) is laid out as the parameters are; everything else (step counts)
  is ``replicated``. Read from the tree's structure, not from a compiled ``init``: XLA places
  outputs that depend on no input (``zeros_like``) on one device."""
  structure = jax.tree.structure(param_shardings)
  like_params = lambda node: jax.tree.structure(node) == structure
  return jax.tree.map(lambda node: param_shardings if like_params(node) else replicated,
                      opt_state, is_leaf=like_params)


def count_state_params(opt_state) -> int:
  """Number of floats in the first Adam moment (= trainable parameters it tracks)."""
  for leaf_state in optax.tree_utils.tree_get_all_with_path(opt_state, "mu"):
    return sum(int(v.size) for v in flatten(leaf_state[1]).values())
  raise ValueError("No Adam moment found in the optimizer state.")
