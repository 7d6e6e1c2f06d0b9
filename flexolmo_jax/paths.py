"""Paths as a command receives them, made absolute once.

A user types relative paths (``workdir/public``), ``~``, trailing slashes and symlinked
directories; the libraries underneath do not all agree on what those mean (Orbax's metadata reader
returns nothing for a relative checkpoint path). Every path therefore goes through
:func:`absolute` where a command starts, so every spelling of the same directory gives the same
result, and the libraries below only ever see one absolute, symlink-free form. URLs
(``gs://bucket/run``) pass through unchanged.
"""
from __future__ import annotations

import os
from typing import Sequence


def is_url(path: str) -> bool:
  return "://" in path


def absolute(path: str | os.PathLike) -> str:
  """``path`` with ``~`` expanded, made absolute against the working directory, symlinks and
  ``..`` resolved, no trailing slash; URLs unchanged."""
  path = os.fspath(path)
  if is_url(path):
    return path
  return os.path.realpath(os.path.expanduser(path))


def absolute_all(paths: str | Sequence[str] | None):
  """:func:`absolute` of one path or of each of a list (``None`` stays ``None``)."""
  if paths is None:
    return None
  if isinstance(paths, (str, os.PathLike)):
    return absolute(paths)
  return [absolute(p) for p in paths]


def absolute_named(item: str) -> str:
  """``NAME=PATH`` with its path made absolute; a bare ``NAME`` is returned unchanged."""
  name, sep, path = item.partition("=")
  return f"{name}={absolute(path)}" if sep else item


def inside(root: str, relative: str, what: str) -> str:
  """``root/relative`` for a path recorded in a file under ``root``; it must stay inside."""
  if os.path.isabs(relative) or is_url(relative):
    raise ValueError(f"{what}: {relative!r} must be a path relative to {root}.")
  root = absolute(root)
  full = absolute(os.path.join(root, relative))
  if os.path.commonpath([root, full]) != root:
    raise ValueError(f"{what}: {relative!r} leads outside {root}.")
  return full


def check_size(path: str, limit: int) -> None:
  """Refuses a file over ``limit`` bytes before anything reads it (files from elsewhere)."""
  size = os.path.getsize(path)
  if size > limit:
    raise ValueError(f"{path}: {size} bytes, above the {limit}-byte limit for this file.")
