"""Expert names and selections: the one place that says what a name is, how ``"a,b"`` is read,
which experts a selection keeps and how many of them are active afterwards.

``public`` names the public model's FFN, expert 0 of every merged model. Any other expert is
one data owner's, named by that owner; a name becomes a directory in merged checkpoints and a
key in files from other organisations, so it matches one strict pattern.
"""
from __future__ import annotations

import re
from typing import Sequence

PUBLIC = "public"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
# After an opt-out leaves fewer experts than top_k: use them all ("clamp") or refuse ("reject").
TOP_K_POLICIES = ("reject", "clamp")


def validate(names: Sequence[str]) -> None:
  """Every name matches :data:`NAME` and none repeats."""
  seen = set()
  for name in names:
    if not isinstance(name, str) or not NAME.fullmatch(name):
      raise ValueError(f"Invalid expert name {name!r}: a name is 1 to 64 letters, digits, '_' "
                       "or '-', starting with a letter or digit.")
    if name in seen:
      raise ValueError(f"Duplicate expert name {name!r} in {list(names)}.")
    seen.add(name)


def parse(value: Sequence[str] | str | None) -> list[str]:
  """``"a,b"`` (as typed after ``--experts``) or a sequence of names -> the list of names."""
  if value is None:
    return []
  return [n for n in (value.split(",") if isinstance(value, str) else value) if n]


def select(all_names: Sequence[str], experts: Sequence[str] | str | None = None,
           exclude: Sequence[str] | str | None = None) -> tuple[str, ...]:
  """The names kept, in the model's order, by ``experts`` (opt in) or ``exclude`` (opt out)."""
  experts, exclude = parse(experts), parse(exclude)
  if experts and exclude:
    raise ValueError("Give --experts or --exclude, not both.")
  unknown = [n for n in experts + exclude if n not in all_names]
  if unknown:
    raise ValueError(f"Unknown expert(s) {unknown}; this model has {list(all_names)}.")
  kept = tuple(n for n in all_names if (n in experts if experts else n not in exclude))
  if not kept:
    raise ValueError("No expert is left: select at least one.")
  return kept


def active(top_k: int, policy: str, selected: Sequence[str]) -> int:
  """How many of the ``selected`` experts are active per token: ``top_k``, or under the
  ``clamp`` policy all of them when fewer remain; ``reject`` refuses a selection that small."""
  if top_k <= len(selected):
    return top_k
  if policy == "clamp":
    return len(selected)
  raise ValueError(f"top_k={top_k} is larger than the {len(selected)} experts selected "
                   f"{list(selected)}; select more, or use the top-k policy 'clamp' "
                   "(flexolmo merge --top-k-policy clamp).")
