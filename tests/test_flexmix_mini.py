"""FlexMix-mini: real local text, disjoint public set, deterministic, distinct domains."""
import collections
import json
import math
import os

import pytest

from flexolmo_jax.data import flexmix_mini, sources


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("flexmix"))
  lines = []
  card = flexmix_mini.build(out, "quick", log=lines.append)
  return out, card, lines


def raw_docs(out, name):
  with open(os.path.join(out, "raw", f"{name}.jsonl"), encoding="utf-8") as fh:
    return [json.loads(l)["text"] for l in fh]


def test_every_domain_has_train_and_validation_and_prints_counts(built):
  out, card, lines = built
  assert set(card["domains"]) == {"code", "prose", "legal", "math", "public"}
  for name, info in card["domains"].items():
    assert info["documents"]["train"] > 0 and info["documents"]["validation"] > 0, name
    assert sources.is_prepared(info["dataset_dir"])
    assert any(name in l and f"{info['byte_tokens']['train']:,} train" in l for l in lines)


def test_public_is_disjoint_from_every_closed_domain(built):
  out, _, _ = built
  public = set(raw_docs(out, "public"))
  for name in flexmix_mini.CLOSED_DOMAINS:
    assert not public & set(raw_docs(out, name)), name
  assert all(d.startswith("[synthetic math") for d in raw_docs(out, "math"))
  # The public set holds a share of every style.
  assert any(d.startswith("[synthetic math") for d in public)
  assert any("import " in d or "def " in d for d in public)


def test_build_is_deterministic(built, tmp_path):
  out, _, _ = built
  flexmix_mini.build(str(tmp_path), "quick", log=lambda _: None)
  for name in flexmix_mini.CLOSED_DOMAINS + ("public",):
    assert raw_docs(out, name) == raw_docs(str(tmp_path), name)


def test_domains_are_distinct(built):
  """A byte-bigram model of each domain's train text scores its own validation text best."""
  out, _, _ = built
  models = {}
  for name in flexmix_mini.CLOSED_DOMAINS:
    docs = raw_docs(out, name)
    train = [d for d in docs if sources.split_of(d, 0.1) == "train"]
    counts = collections.Counter()
    for d in train:
      b = d.encode()
      counts.update(zip(b, b[1:]))
    models[name] = counts

  def nll(model, text):
    b = text.encode()
    total = sum(model.values()) + 65536
    return -sum(math.log((model[p] + 1) / total) for p in zip(b, b[1:])) / max(1, len(b) - 1)

  for name in flexmix_mini.CLOSED_DOMAINS:
    val = "".join(d for d in raw_docs(out, name) if sources.split_of(d, 0.1) == "validation")
    scores = {m: nll(models[m], val) for m in models}
    assert min(scores, key=scores.get) == name, (name, scores)
