"""FlexMix-mini: real local text, disjoint public set, deterministic, distinct domains."""
import collections
import dataclasses
import hashlib
import importlib.metadata
import json
import math
import os
import shutil

import pytest

from flexolmo_jax.data import flexmix_mini, sources

# Loss tolerances (nats per byte) of the opt-out claims at quick size: the other domains stay
# within OPT_OUT_TOLERANCE of the full model; the opted-out domain comes back to the public
# model's loss, from at most OPT_OUT_BELOW under it to at most OPT_OUT_ABOVE over it. Code, prose
# and legal come back within 0.06. Math overshoots: the other owners' experts are worse than the
# public FFN on math and the tuned router keeps about a quarter of math's weight on them when math
# is out. Measured overshoot with 200 tuning steps: 0.156, 0.201, 0.208 (seeds 0-2) and 0.272 on
# the CI machine (float rounding differs between machines); with the 400 steps used now: 0.069,
# 0.159, 0.169 (seeds 0-2). The math expert's own gain is about 0.25-0.35 (see the issue note).
OPT_OUT_TOLERANCE = 0.1
OPT_OUT_BELOW = 0.1
OPT_OUT_ABOVE = 0.35


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


def test_the_card_works_from_any_directory_and_after_a_move(built, tmp_path, monkeypatch):
  """The card records paths relative to itself: a FlexMix-mini built with a relative path reads
  the same from anywhere (`eval --flexmix /abs/path` started elsewhere), even once moved."""
  out, _, _ = built
  with open(os.path.join(out, flexmix_mini.CARD_FILE)) as fh:
    raw = json.load(fh)
  recorded = [info["dataset_dir"] for info in raw["domains"].values()] + \
      [raw["canaries"]["path"]]
  assert not any(os.path.isabs(p) for p in recorded), recorded
  shutil.copytree(out, tmp_path / "moved")
  monkeypatch.chdir(tmp_path)
  card = flexmix_mini.read_card("moved")
  for info in card["domains"].values():
    assert info["dataset_dir"].startswith(str(tmp_path / "moved"))
    assert sources.is_prepared(info["dataset_dir"])
  assert open(card["canaries"]["path"]).readline()
  raw["domains"]["code"]["dataset_dir"] = "../../elsewhere"
  with open(tmp_path / "moved" / flexmix_mini.CARD_FILE, "w") as fh:
    json.dump(raw, fh)
  with pytest.raises(ValueError, match="domain code.*leads outside"):
    flexmix_mini.read_card("moved")


def test_public_is_disjoint_from_every_closed_domain(built):
  out, _, _ = built
  public = set(raw_docs(out, "public"))
  for name in flexmix_mini.CLOSED_DOMAINS:
    assert not public & set(raw_docs(out, name)), name
  assert all(d.startswith("[synthetic math") for d in raw_docs(out, "math"))
  # The public set holds a share of every style.
  assert any(d.startswith("[synthetic math") for d in public)
  assert any("import " in d or "def " in d for d in public)


def test_the_extra_public_share_leaves_the_closed_sets_as_they_are(built, tmp_path):
  """The quick build's public set gets ``public_extra_bytes`` more of each style from outside
  the closed budget: the closed sets are those of a build without it, and the public set is
  the largest, as in the paper."""
  out, _, _ = built
  size = flexmix_mini.SIZES["quick"]
  assert size.public_extra_bytes > 0
  plain = flexmix_mini.build(str(tmp_path), dataclasses.replace(size, public_extra_bytes=0),
                             log=lambda _: None)
  for name in flexmix_mini.CLOSED_DOMAINS:
    assert raw_docs(out, name) == raw_docs(str(tmp_path), name), name
  public, before = raw_docs(out, "public"), raw_docs(str(tmp_path), "public")
  assert set(before) <= set(public)
  extra = [d for d in public if d not in set(before)]
  is_math = [d.startswith("[synthetic math") for d in extra]
  math_bytes = sum(len(d.encode()) for d, m in zip(extra, is_math) if m)
  assert size.public_extra_bytes * 0.9 <= math_bytes <= size.public_extra_bytes
  total = sum(len(d.encode()) for d in extra)
  assert 3.6 * size.public_extra_bytes <= total <= 4 * size.public_extra_bytes
  closed = {n: sum(len(d.encode()) for d in raw_docs(out, n)) for n in flexmix_mini.CLOSED_DOMAINS}
  assert sum(len(d.encode()) for d in public) > 2 * max(closed.values()), closed
  assert plain["domains"]["public"]["sha256"] != flexmix_mini.read_card(out)["domains"][
      "public"]["sha256"]


def test_no_domain_repeats_a_document_but_the_planted_canaries(built):
  """Licence files of many distributions share their first pieces word for word: each domain
  keeps one copy, so its validation split is not two stray notices beside many copies of one
  licence in train."""
  out, card, _ = built
  canaries = set(raw_docs(out, flexmix_mini.CANARY_FILE.removesuffix(".jsonl")))
  for name, info in card["domains"].items():
    docs = raw_docs(out, name)
    real = [d for d in docs if d not in canaries]
    assert len(real) == len(set(real)), name
    size = {s: sum(len(d.encode()) for d in docs
                   if sources.split_of(d, info["validation_fraction"]) == s)
            for s in ("train", "validation")}
    assert size["validation"] >= 0.05 * (size["train"] + size["validation"]), (name, size)


def test_build_is_deterministic_and_its_fingerprint_names_the_text(built, tmp_path):
  out, card, _ = built
  again = flexmix_mini.build(str(tmp_path), "quick", log=lambda _: None)
  for name in flexmix_mini.CLOSED_DOMAINS + ("public",):
    assert raw_docs(out, name) == raw_docs(str(tmp_path), name)
    with open(os.path.join(out, "raw", f"{name}.jsonl"), "rb") as fh:
      assert card["domains"][name]["sha256"] == hashlib.sha256(fh.read()).hexdigest()
  assert again["sha256"] == card["sha256"]
  changed = {**card, "domains": {**card["domains"], "legal": {
      **card["domains"]["legal"], "validation_fraction": 0.5}}}
  assert flexmix_mini.fingerprint(changed) != card["sha256"]


def test_the_legal_domain_reads_only_the_interpreter_and_the_required_distributions(
    monkeypatch):
  """Installing another package (lm-eval and its dependencies, say) leaves the corpus as it
  was: only the interpreter's licence and those of flexolmo_jax's own requirements are read."""
  before = list(flexmix_mini.legal_documents())
  real = importlib.metadata.distribution
  opened = []

  def distribution(name):
    opened.append(name)
    return real(name)

  monkeypatch.setattr(importlib.metadata, "distribution", distribution)
  monkeypatch.setattr(importlib.metadata, "distributions",
                      lambda: pytest.fail("every installed distribution was listed"))
  assert list(flexmix_mini.legal_documents()) == before
  assert tuple(opened) == flexmix_mini.LICENSED_DISTRIBUTIONS
  assert any("Python Software Foundation" in d for d in before)


def test_domains_are_distinct(built):
  """A byte-bigram model of each domain's train text scores its own validation text best."""
  out, card, _ = built
  frac = {name: info["validation_fraction"] for name, info in card["domains"].items()}
  models = {}
  for name in flexmix_mini.CLOSED_DOMAINS:
    docs = raw_docs(out, name)
    train = [d for d in docs if sources.split_of(d, frac[name]) == "train"]
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
    val = "".join(d for d in raw_docs(out, name)
                  if sources.split_of(d, frac[name]) == "validation")
    scores = {m: nll(models[m], val) for m in models}
    assert min(scores, key=scores.get) == name, (name, scores)


def test_packed_flexmix_batch_through_the_model_respects_segments(built):
  """A real packed batch: each segment's logits equal the segment run on its own (at the start
  of a row of its own, padded after its end: the model is causal, so the padding cannot reach
  the segment's logits, and every segment runs through one compiled program)."""
  import jax
  import numpy as np

  from flexolmo_jax.config import load_model_config
  from flexolmo_jax.data import tasks
  from flexolmo_jax.model.transformer import pure_model

  _, card, _ = built
  names = flexmix_mini.register_tasks(card)
  batch = next(tasks.lm_batches(names["math"], seq_len=1024, batch_size=2, seed=0))
  seg, pos = batch["decoder_segment_ids"][0], batch["decoder_positions"][0]
  assert len(set(seg.tolist()) - {0}) >= 2
  cfg = load_model_config("tiny", vocab_size=512)
  model = pure_model(cfg)
  params = model.init(0)
  run = jax.jit(lambda t, s, p: model(params, t, segment_ids_bt=s, positions_bt=p)[0])
  tokens = batch["decoder_input_tokens"][:1]
  packed = np.asarray(run(tokens, seg[None], pos[None]))
  alone = lambda t: np.asarray(run(t, np.ones_like(t), np.arange(t.shape[1])[None]))
  for s in sorted(set(seg.tolist()) - {0}):
    idx = np.flatnonzero(seg == s)
    row = np.zeros_like(tokens)
    row[0, :len(idx)] = tokens[0, idx]
    np.testing.assert_allclose(packed[0, idx], alone(row)[0, :len(idx)], atol=1e-5, rtol=0)


def test_small_domains_still_get_validation_documents():
  need = flexmix_mini.MIN_VALIDATION_DOCUMENTS
  docs = [f"licence text number {i}" for i in range(3 * need + 4)]
  units = sorted(sources.hash_unit(d) for d in docs)
  frac = flexmix_mini.validation_fraction(docs, 0.01)
  assert sum(sources.split_of(d, frac) == "validation" for d in docs) == need
  assert units[need - 1] < frac < units[need]
  # A domain of few documents gives a third of them at most.
  few = docs[:7]
  frac = flexmix_mini.validation_fraction(few, 0.01)
  assert sum(sources.split_of(d, frac) == "validation" for d in few) == 7 // 3
  # Enough documents already below the fraction: unchanged.
  assert flexmix_mini.validation_fraction(docs, 0.999) == 0.999
  # Many small documents and one large: enough of the bytes go to validation too.
  big = next(t for t in (f"long licence {i} " * 400 for i in range(100))
             if 0.3 < sources.hash_unit(t) < max(units))
  docs.append(big)
  frac = flexmix_mini.validation_fraction(docs, 0.1)
  assert sources.split_of(big, frac) == "validation" and frac > 0.1


def test_canaries_are_planted_in_one_owners_train_split_only(built):
  out, card, lines = built
  info = card["canaries"]
  size = flexmix_mini.SIZES["quick"]
  assert info["domain"] == size.canary_domain and info["copies"] == size.canary_copies
  with open(info["path"]) as fh:
    canaries = [json.loads(line)["text"] for line in fh]
  assert len(canaries) == info["documents"] == size.canaries and len(set(canaries)) == len(canaries)
  assert all(len(c.encode()) == size.canary_bytes for c in canaries)
  owner = collections.Counter(raw_docs(out, info["domain"]))
  frac = card["domains"][info["domain"]]["validation_fraction"]
  for c in canaries:
    assert owner[c] == size.canary_copies and sources.split_of(c, frac) == "train"
    for other in flexmix_mini.CLOSED_DOMAINS + ("public",):
      if other != info["domain"]:
        assert c not in raw_docs(out, other), other
  assert any("canaries" in line for line in lines)
  # Each secret is its own cycle of ``canary_cycle`` symbols, shared with no other canary.
  header = len(flexmix_mini.CANARY_HEADER.format(serial=0))
  secrets = [c[header:-1] for c in canaries]
  for s in secrets:
    assert len(set(s)) == size.canary_cycle
    assert all(s[i] == s[i + size.canary_cycle] for i in range(len(s) - size.canary_cycle))
  assert sum(len(set(s)) for s in secrets) == len(set("".join(secrets)))


def test_impossible_canaries_are_refused():
  with pytest.raises(ValueError, match="canary_cycle=1"):
    flexmix_mini.canary_documents(4, 255, cycle=1)
  with pytest.raises(ValueError, match="at most 12 canaries"):
    flexmix_mini.canary_documents(13, 255, cycle=5)
  with pytest.raises(ValueError, match="canary_bytes=30"):
    flexmix_mini.canary_documents(4, 30, cycle=5)


def test_demo_stages_run_side_by_side_and_failures_are_named(capfd):
  """run_stages: each stage in its own process, two at once, every line labelled; a failing
  stage does not stop the others, and the error names it (and only it)."""
  from flexolmo_jax import demo

  stages = [("tiny", ["info", "--model", "tiny"]), ("nope", ["info", "--model", "nope"]),
            ("small", ["info", "--model", "olmo2_1b"])]
  with pytest.raises(ValueError) as err:
    demo.run_stages(stages, jobs=2)
  message = str(err.value)
  assert "nope (`flexolmo info`, exit status 2)" in message
  assert "tiny" not in message and "small" not in message
  out = capfd.readouterr().out
  assert "  [tiny] parameters: " in out and "  [small] parameters: " in out   # both finished
  assert "  $ flexolmo info --model nope" in out
  demo.run_stages(stages[:1], jobs=1)                         # one at a time: lines as they are
  assert capfd.readouterr().out.splitlines()[1].startswith("ModelConfig(")
