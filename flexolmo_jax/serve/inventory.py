"""``/v1/experts``: what a served model is made of, from its manifests (checked when opened).

Each expert is listed with its data card (the names of the sources it was trained on, never
their paths: a card written elsewhere is reduced to names here), its differential-privacy
guarantee and fingerprints: the hash of its files' manifest entries, and the public model it
was trained against.
"""
from __future__ import annotations

import hashlib
import json
import os
import re

from flexolmo_jax.checkpoint import merged_model, store
from flexolmo_jax.experts import PUBLIC
from flexolmo_jax.privacy import accounting

_NAME = re.compile(r"^[\w.+-]+(/[\w.+-]+)?$")
CARD_FIELDS = ("domain", "steps", "tokens_seen", "documents_seen")


def source_name(source: str) -> str:
  """A source's name without its directories: ``flexmix_code/1.0.0`` stays, and
  ``/data/owner/code.jsonl`` becomes ``code.jsonl``."""
  source = str(source).replace("\\", "/").rstrip("/")
  if _NAME.match(source) and not source.startswith("."):
    return source
  return source.rsplit("/", 1)[-1] or "?"


def files_fingerprint(manifest: dict) -> str:
  """sha256 over a checkpoint's file entries (names and hashes): a change to any file shows."""
  entries = json.dumps(manifest.get("files", {}), sort_keys=True).encode()
  return hashlib.sha256(entries).hexdigest()


def card_summary(card: dict | None) -> dict:
  card = card or {}
  out = {k: card[k] for k in CARD_FIELDS if k in card}
  out["sources"] = [source_name(s) for s in card.get("sources", [])]
  return out


def experts(path: str) -> list[dict]:
  """One entry per expert of the model at ``path`` (public first), or [] for a dense model."""
  path = store.saved_dir(path)
  manifest = store.read_manifest(path)
  if manifest.get("kind") != merged_model.KIND:
    return []
  public = store.read_manifest(os.path.join(path, merged_model.PUBLIC_DIR))
  cards = manifest.get("data_cards", {})
  out = []
  for name in manifest["experts"]:
    if name == PUBLIC:
      card, fingerprint, anchor = public.get("data_card"), public.get("fingerprint"), None
    else:
      expert = store.read_manifest(os.path.join(path, merged_model.EXPERTS_DIR, name))
      card, fingerprint = cards.get(name, expert.get("data_card")), files_fingerprint(expert)
      anchor = expert.get("anchor_fingerprint")
    dp = (card or {}).get("dp")
    out.append({"name": name, "data_card": card_summary(card), "dp": dp,
                "privacy": accounting.describe(name, card or {}),
                "fingerprint": fingerprint, "anchor_fingerprint": anchor})
  return out
