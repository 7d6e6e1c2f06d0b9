"""The trainable and frozen halves of a parameter tree (nested dicts), and their union.

A trainer differentiates only the trainable half; the frozen half is an input of the step that
is never updated or written back. ``join(*split(tree, f)) == tree`` for any predicate ``f``.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

Path = tuple[str, ...]


def split(tree: Mapping[str, Any], is_trainable: Callable[[Path], bool],
          _path: Path = ()) -> tuple[dict, dict]:
  """(trainable, frozen): the leaves whose key path ``is_trainable`` and the others, each in a
  tree of the same nesting (branches with no leaf of a half are left out of it)."""
  trainable, frozen = {}, {}
  for key, value in tree.items():
    path = (*_path, key)
    if isinstance(value, Mapping):
      t, f = split(value, is_trainable, path)
      if t:
        trainable[key] = t
      if f:
        frozen[key] = f
    elif is_trainable(path):
      trainable[key] = value
    else:
      frozen[key] = value
  return trainable, frozen


def join(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict:
  """The union of two trees without a leaf in common (the halves :func:`split` makes)."""
  out = dict(a)
  for key, value in b.items():
    if key not in out:
      out[key] = value
    elif isinstance(value, Mapping) and isinstance(out[key], Mapping):
      out[key] = join(out[key], value)
    else:
      raise ValueError(f"Both trees hold a leaf at {key!r}.")
  return out
