"""FlexMix-mini: the embedded default corpus, built from real text on any Python install.

Closed domains (one data owner each):

- ``code``  Python source files of the standard library (tests, idlelib and site-packages excluded).
- ``prose`` English technical prose: the documentation topics bundled with Python
            (``pydoc_data.topics``), one document per topic paragraph group.
- ``legal`` licence texts: the interpreter's LICENSE.txt and the licence/notice files of the
            distributions flexolmo_jax requires (LICENSED_DISTRIBUTIONS), never of whatever else
            is installed: the corpus changes only with those distributions' versions, and its
            fingerprint (the card's ``sha256``) says whether two builds hold the same text.
- ``math``  SYNTHETIC arithmetic and algebra worked examples from a seeded generator (labelled
            as synthetic in every document).

``public`` is disjoint from every closed set: a stable-hash share (``public_fraction``) of each
style's documents is held out of the closed domains and pooled into the public set, so the public
model sees a little of every style, as FlexOlmo's public mix does, but never a closed document.
``public_extra_bytes`` adds to the public set alone that many more bytes of each style, drawn
from the documents the closed budget left out, so that the public set can be the largest, as it
is in the paper (1T public tokens against ~50B per expert) while the closed sets stay as they
are. The quick build needs it: with only its 15% share, the public set was 72 KB, which the quick
public model saw 13 times in pre-training; it learned that text better than any expert could
improve on it, and router tuning on it learned to prefer the public expert everywhere
(docs/results.md). The default build has no prose or legal text left outside its 600 KB budget
(the sources hold about 465 KB and 513 KB), so it takes a larger share instead: 30% of each
style goes to the public set (616 KB of training text, against 290-333 KB per owner).

Every domain keeps one copy of each document: many distributions ship the same licence with
its own copyright appendix, so whole files differ while their first pieces are the same text
(a quick build once held 16 copies of the Apache licence's first 4 KB among 29 legal documents,
and 2 documents of validation). Every document is assigned by a hash of its text, so the build
is deterministic. Each domain is
written as JSONL (``raw/<domain>.jsonl``) and prepared as a TFDS dataset (``tfds/``).

Canaries: ``canaries`` SYNTHETIC secret documents are planted, ``canary_copies`` times each, in
the train split of ``canary_domain``. They measure training-data extraction (docs/method.md §9): a
model that reproduces them learned them from that owner's data only. The distinct canaries are
listed in ``raw/canaries.jsonl``. Each is a header, then a secret cycle (a random order of
``canary_cycle`` symbols that no other canary uses) repeated: memorizing one is a table of
``canary_cycle`` successors. The tiny models cannot infer a cycle in context: the public model's
loss on such text is 6.4-7.4 nats per token for cycles of 3 to 15 symbols (worse than uniform),
so a model that reproduces a canary learned it. Random words, tried first, were memorized by no
model (loss 2.8 vs 2.6). The cycle was 15 symbols until the owner's expert was seen to memorize
5 far better (default size, the public model and the other experts fixed, legal expert alone
with the public one: 2/4 canaries extracted and canary loss 0.33 at cycle 5, 0/4 and 1.13 at
15). A canary is shorter than one training sequence (``canary_bytes``), so it is always learned
whole, from position 0, as extraction prompts it.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib.metadata
import itertools
import json
import os
import random
import string
import sysconfig
from typing import Callable, Iterator

from flexolmo_jax import paths
from flexolmo_jax.data import sources

CLOSED_DOMAINS = ("code", "prose", "legal", "math")
PUBLIC = "public"


@dataclasses.dataclass(frozen=True)
class FlexMixSize:
  """Per-domain budget of UTF-8 bytes (closed share plus public share)."""

  bytes_per_domain: int = 600_000
  public_fraction: float = 0.15
  # Bytes of each style added to the public set alone, from documents outside the closed budget
  # (math: examples generated after the closed ones), so the closed sets stay as they are.
  public_extra_bytes: int = 0
  validation_fraction: float = 0.1
  math_documents: int = 3000
  canaries: int = 4
  canary_copies: int = 24
  canary_domain: str = "legal"
  canary_cycle: int = 5        # symbols in each canary's secret cycle (module docstring)
  # Each canary's length in bytes. With its EOS it must fit in one training sequence: a longer
  # one is cut into chunks, and its tail chunk (a few secret symbols, then EOS, at position 0)
  # teaches the model to stop early where a prompt starts the canary.
  canary_bytes: int = 255


# Both sizes give the public set two to three times any owner's text (module docstring).
SIZES = {"default": FlexMixSize(public_fraction=0.3),
         "quick": FlexMixSize(bytes_per_domain=120_000, public_extra_bytes=60_000,
                              math_documents=600, canary_bytes=127)}
CANARY_FILE = "canaries.jsonl"
CARD_FILE = "flexmix_mini.json"
CANARY_SYMBOLS = string.ascii_lowercase + string.ascii_uppercase + string.digits


def _stable_unit(text: str, salt: str) -> float:
  digest = hashlib.sha256((salt + "\0" + text).encode("utf-8", "surrogatepass")).digest()
  return int.from_bytes(digest[:8], "big") / 2**64


PIECE_CHARS = 4000


def _pieces(text: str, max_chars: int = PIECE_CHARS) -> Iterator[str]:
  """Splits a long text at blank lines into documents of about ``max_chars`` (small corpora need
  many documents for a validation split; a 100 KB file would otherwise be a single document)."""
  part, size = [], 0
  for para in text.split("\n\n"):
    part.append(para)
    size += len(para) + 2
    if size >= max_chars:
      yield "\n\n".join(part).strip("\n")
      part, size = [], 0
  if part and "\n\n".join(part).strip():
    yield "\n\n".join(part).strip("\n")


def code_documents() -> Iterator[str]:
  lib = sysconfig.get_paths()["stdlib"]
  skip = ("/test", "/tests", "idlelib", "site-packages", "lib2to3", "/turtledemo")
  for path in sorted(glob.glob(os.path.join(lib, "**", "*.py"), recursive=True)):
    if any(s in path for s in skip):
      continue
    with open(path, "rb") as fh:
      text = fh.read().decode("utf-8", errors="replace")
    if text.strip():
      yield from _pieces(text)


def prose_documents() -> Iterator[str]:
  import pydoc_data.topics

  for name in sorted(pydoc_data.topics.topics):
    yield from _pieces(pydoc_data.topics.topics[name].strip())


# The distributions every install of flexolmo_jax has (setup.py's install_requires). Extras
# and the packages they pull in are left out: an environment with lm-eval once held 16 more
# copies of the Apache licence and changed what the legal owner's expert learned.
LICENSED_DISTRIBUTIONS = (
    "dp-accounting", "flax", "gin-config", "importlib_resources", "jax", "jax-privacy", "jaxlib",
    "matplotlib", "ml_dtypes", "numpy", "optax", "orbax-checkpoint", "seqio", "sentencepiece",
    "tensorboard", "tensorflow", "tensorflow-datasets")
LICENCE_NAMES = ("LICENSE", "LICENCE", "COPYING", "NOTICE")


def legal_documents() -> Iterator[str]:
  files = [os.path.join(sysconfig.get_paths()["stdlib"], "LICENSE.txt")]
  for name in LICENSED_DISTRIBUTIONS:
    try:
      dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
      continue
    files += sorted(str(dist.locate_file(f)) for f in dist.files or []
                    if os.path.basename(str(f)).upper().startswith(LICENCE_NAMES))
  for path in files:
    if not os.path.isfile(path):
      continue
    with open(path, "rb") as fh:
      text = fh.read().decode("utf-8", errors="replace").strip()
    if text:
      yield from _pieces(text)


def math_documents(n: int, seed: int = 0) -> Iterator[str]:
  """SYNTHETIC worked examples: arithmetic, linear equations, powers, fractions."""
  rng = random.Random(seed)
  for i in range(n):
    kind = i % 4
    if kind == 0:
      a, b, c = rng.randint(2, 999), rng.randint(2, 999), rng.randint(2, 99)
      body = (f"Compute ({a} + {b}) * {c}.\nFirst add: {a} + {b} = {a + b}.\n"
              f"Then multiply: {a + b} * {c} = {(a + b) * c}.\nAnswer: {(a + b) * c}.")
    elif kind == 1:
      x, m, k = rng.randint(-50, 50), rng.randint(2, 20), rng.randint(-100, 100)
      rhs = m * x + k
      body = (f"Solve for x: {m}x + {k} = {rhs}.\nSubtract {k} from both sides: {m}x = "
              f"{rhs - k}.\nDivide by {m}: x = {x}.\nCheck: {m} * {x} + {k} = {rhs}.")
    elif kind == 2:
      base, exp = rng.randint(2, 12), rng.randint(2, 6)
      steps = " = ".join(str(base ** j) for j in range(1, exp + 1))
      body = (f"Evaluate {base}^{exp}.\nRepeated multiplication by {base}: {steps}.\n"
              f"So {base}^{exp} = {base ** exp}.")
    else:
      p, q, r, s = (rng.randint(1, 12) for _ in range(4))
      num, den = p * s + r * q, q * s
      from math import gcd
      g = gcd(num, den)
      body = (f"Add the fractions {p}/{q} + {r}/{s}.\nCommon denominator {q} * {s} = {den}.\n"
              f"Numerator {p} * {s} + {r} * {q} = {num}.\nSimplify {num}/{den} by {g}: "
              f"{num // g}/{den // g}.")
    yield f"[synthetic math, FlexMix-mini generator, example {i}]\n{body}"


CANARY_HEADER = "Canary {serial:04d}, secret: "


def canary_documents(n: int, length: int = 255, cycle: int = 5, seed: int = 0) -> list[str]:
  """SYNTHETIC secrets of ``length`` bytes: a header naming the canary, then its own secret cycle
  of ``cycle`` symbols (disjoint from every other canary's) repeated, then ".". Each lands in
  the train split (its content hash is above one half, far above any validation fraction), so it
  is seen in training and never evaluated."""
  if cycle < 2:
    raise ValueError(f"FlexMixSize.canary_cycle={cycle}: a secret cycle needs at least 2 symbols.")
  if n * cycle > len(CANARY_SYMBOLS):
    raise ValueError(f"FlexMixSize.canaries={n}: at most {len(CANARY_SYMBOLS) // cycle} "
                     f"canaries have disjoint {cycle}-symbol secrets.")
  shortest = len(CANARY_HEADER.format(serial=0)) + 2 * cycle + 1
  if length < shortest:
    raise ValueError(f"FlexMixSize.canary_bytes={length}: a canary needs at least {shortest} "
                     f"bytes (its header and two turns of its {cycle}-symbol secret).")
  rng = random.Random(seed)
  out, serial = [], 0
  while len(out) < n:
    serial += 1
    own = list(CANARY_SYMBOLS[len(out) * cycle:(len(out) + 1) * cycle])
    rng.shuffle(own)
    text = CANARY_HEADER.format(serial=serial)
    text += "".join(own) * (length // cycle + 1)
    text = text[:length - 1] + "."
    if sources.hash_unit(text) >= 0.5:
      out.append(text)
  return out


def _budgeted(docs: Iterator[str], budget: int, salt: str) -> list[str]:
  """A deterministic, content-shuffled selection of distinct documents up to ``budget`` bytes."""
  ranked = sorted(set(docs), key=lambda t: _stable_unit(t, salt))
  out, used = [], 0
  for text in ranked:
    n = len(text.encode("utf-8"))
    if used + n > budget and out:
      continue
    out.append(text)
    used += n
    if used >= budget:
      break
  return out


# A domain's validation split holds at least this many documents (a third of them at most). Its
# routing and losses are measured on that split alone: the quick build's legal split once held
# the 2-document minimum, the Apache licence's definitions and zlib's licence, and its routing
# said more about those two texts than about licence text (prose's expert led there, while on
# held-out chunks of legal's train split legal's expert led: 0.12-0.14 against 0.10-0.11).
MIN_VALIDATION_DOCUMENTS = 6


def validation_fraction(docs: list[str], fraction: float) -> float:
  """``fraction``, raised just enough that at least MIN_VALIDATION_DOCUMENTS documents (a third
  of them at most), and at least half of ``fraction``'s share of the bytes, fall below it.

  The split is by document hash, so its share of bytes is luck: a domain of a few licence files
  must still have a validation split, and one of many small documents (the public set's math
  examples) must not evaluate on a thousand bytes."""
  ranked = sorted((sources.hash_unit(text), len(text.encode("utf-8"))) for text in docs)
  need = max(1, min(MIN_VALIDATION_DOCUMENTS, len(ranked) // 3))
  want = fraction / 2 * sum(n for _, n in ranked)
  taken = 0
  for k, (unit, n) in enumerate(ranked):
    if k >= need and taken >= want:
      return fraction if ranked[k - 1][0] < fraction else (ranked[k - 1][0] + unit) / 2
    taken += n
  return fraction


def _pools(size: FlexMixSize) -> dict[str, tuple[Iterator[str], Callable[[], Iterator[str]]]]:
  """{style: (its documents, a function giving the documents its extra public share is drawn
  from)}: the same documents for the real-text styles; for math, the examples generated after
  the closed budget's ``math_documents``, so that the closed math set does not depend on the
  extra share."""
  extra_math = max(1, size.public_extra_bytes // 100)  # the examples are 100-200 bytes long
  pools = {"code": code_documents, "prose": prose_documents, "legal": legal_documents}
  out = {name: (gen(), gen) for name, gen in pools.items()}
  out["math"] = (math_documents(size.math_documents),
                 lambda: itertools.islice(
                     math_documents(size.math_documents + extra_math), size.math_documents, None))
  return out


def build(out_dir: str, size: str | FlexMixSize = "default", *,
          log: Callable[[str], None] = print) -> dict:
  """Writes raw/<domain>.jsonl and prepares tfds/<domain> for every domain; returns the card."""
  size = SIZES[size] if isinstance(size, str) else size
  domains: dict[str, list[str]] = {d: [] for d in CLOSED_DOMAINS + (PUBLIC,)}
  for name, (pool, extra_pool) in _pools(size).items():
    chosen = _budgeted(pool, size.bytes_per_domain, salt=name)
    for text in chosen:
      target = PUBLIC if _stable_unit(text, "public") < size.public_fraction else name
      domains[target].append(text)
    if size.public_extra_bytes:
      taken = set(chosen)
      domains[PUBLIC] += _budgeted((t for t in extra_pool() if t not in taken),
                                   size.public_extra_bytes, salt=f"{name}/public")
  canaries = (canary_documents(size.canaries, size.canary_bytes, size.canary_cycle)
              if size.canaries else [])
  if canaries and size.canary_domain not in CLOSED_DOMAINS:
    raise ValueError(f"FlexMixSize.canary_domain={size.canary_domain!r}: choose one of "
                     f"{CLOSED_DOMAINS}.")
  for _ in range(size.canary_copies):
    domains[size.canary_domain].extend(canaries)
  raw_dir = os.path.join(out_dir, "raw")
  os.makedirs(raw_dir, exist_ok=True)
  card = {"size": dataclasses.asdict(size), "domains": {}}
  for name, docs in domains.items():
    path = os.path.join(raw_dir, f"{name}.jsonl")
    tmp = path + ".tmp"
    data = "".join(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in docs)
    data = data.encode("utf-8")
    with open(tmp, "wb") as fh:
      fh.write(data)
    os.replace(tmp, path)
    fraction = validation_fraction(docs, size.validation_fraction)
    assert not any(sources.split_of(c, fraction) == "validation" for c in canaries), fraction
    spec = sources.SourceSpec(paths=(path,), validation_fraction=fraction)
    _, stats = sources.prepare(f"flexmix_{name}", spec, os.path.join(out_dir, "tfds"),
                               overwrite=True)
    tokens = {s: stats.utf8_bytes[s] + stats.documents[s] for s in stats.documents}  # + EOS
    card["domains"][name] = {"documents": stats.documents, "byte_tokens": tokens,
                             "validation_fraction": fraction,
                             "sha256": hashlib.sha256(data).hexdigest(),
                             "dataset_dir": f"tfds/flexmix_{name}/1.0.0"}
    log(f"FlexMix-mini {name:>6}: {sum(stats.documents.values()):5d} documents, "
        f"{tokens['train']:,} train / {tokens['validation']:,} validation byte tokens")
  if canaries:
    path = os.path.join(raw_dir, CANARY_FILE)
    with open(path + ".tmp", "w", encoding="utf-8") as fh:
      fh.writelines(json.dumps({"text": c}) + "\n" for c in canaries)
    os.replace(path + ".tmp", path)
    card["canaries"] = {"domain": size.canary_domain, "copies": size.canary_copies,
                        "documents": len(canaries), "path": f"raw/{CANARY_FILE}"}
    log(f"FlexMix-mini canaries: {len(canaries)} synthetic secrets planted "
        f"{size.canary_copies} times each in {size.canary_domain}'s train split")
  card["sha256"] = fingerprint(card)
  log(f"FlexMix-mini fingerprint: {card['sha256'][:16]}")
  with open(os.path.join(out_dir, CARD_FILE), "w") as fh:
    json.dump(card, fh, indent=1)
  return read_card(out_dir)


def fingerprint(card: dict) -> str:
  """One SHA-256 over every domain's documents and validation split: two builds with the same
  fingerprint train and evaluate on the same text."""
  digest = hashlib.sha256()
  for name in sorted(card["domains"]):
    info = card["domains"][name]
    digest.update(f"{name}\0{info['sha256']}\0{info['validation_fraction']!r}\n".encode())
  return digest.hexdigest()


def read_card(directory: str) -> dict:
  """The card of the FlexMix-mini built in ``directory``, its paths made absolute there.

  The card records paths relative to its own directory, so a FlexMix-mini reads the same from
  any working directory and after the directory is moved."""
  path = os.path.join(directory, CARD_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{directory}: no {CARD_FILE} there (a FlexMix-mini directory holds "
                            "one: `flexolmo data flexmix-mini --out DIR`, or WORKDIR/flexmix_mini "
                            "of the demo).")
  with open(path) as fh:
    card = json.load(fh)
  for name, info in card["domains"].items():
    info["dataset_dir"] = paths.inside(directory, info["dataset_dir"], f"{path}: domain {name}")
  if "canaries" in card:
    card["canaries"]["path"] = paths.inside(directory, card["canaries"]["path"],
                                            f"{path}: canaries")
  return card


def register_tasks(card: dict, prefix: str = "flexmix_") -> dict[str, str]:
  """Registers one seqio Task per FlexMix-mini domain; returns {domain: task name}."""
  from flexolmo_jax.data import tasks

  names = {}
  for domain, info in card["domains"].items():
    names[domain] = f"{prefix}{domain}"
    tasks.register_domain_task(names[domain], info["dataset_dir"])
  return names
