"""The dense models a baseline combines, checked against each other and the public model."""
from __future__ import annotations

from typing import Sequence

from flexolmo_jax.checkpoint import store


def read_members(paths: Sequence[str]) -> list[tuple[str, dict]]:
  """(directory, manifest) of each dense member, checked against the first."""
  if len(paths) < 2:
    raise ValueError(f"A baseline combines at least 2 dense models; got {len(paths)}.")
  members = []
  for path in paths:
    path = store.saved_dir(path)
    manifest = store.read_manifest(path, "dense")
    if members:
      first_path, first = members[0]
      for key in ("anchor_fingerprint", "config", "vocabulary"):
        if manifest.get(key) != first.get(key):
          raise ValueError(f"dense model {manifest.get('name')!r} ({path}) has a different "
                           f"{key} from {first.get('name')!r} ({first_path}).")
    if any(m.get("name") == manifest.get("name") for _, m in members):
      raise ValueError(f"Two dense models are named {manifest.get('name')!r}.")
    members.append((path, manifest))
  return members


def check_anchor(members: Sequence[tuple[str, dict]], public_path: str,
                 public_manifest: dict) -> None:
  """Every member must be continued from this public model."""
  for path, m in members:
    if m.get("anchor_fingerprint") != public_manifest["fingerprint"]:
      raise ValueError(
          f"dense model {m.get('name')!r} ({path}) was continued from public model "
          f"{str(m.get('anchor_fingerprint'))[:16]}, not from {public_path} "
          f"({public_manifest['fingerprint'][:16]}).")
