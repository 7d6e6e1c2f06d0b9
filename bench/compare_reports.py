"""Are two demo runs the same? Compares two ``report.json`` files number for number.

    flexolmo demo --quick --workdir run_a && flexolmo demo --quick --workdir run_b
    python bench/compare_reports.py run_a/report.json run_b/report.json

Timings (``seconds``, ``stage_seconds``) are left out: they are the only values that may differ
between two runs with the same seed on the same machine. Exit status 0 when everything else is
equal, 1 (listing each difference) when not.
"""
from __future__ import annotations

import json
import sys

TIMINGS = ("seconds", "stage_seconds")


def differences(a, b, where: str = "") -> list[str]:
  if isinstance(a, dict) and isinstance(b, dict):
    out = [f"{where}/{k}: only in the {'first' if k in a else 'second'}"
           for k in sorted(set(a) ^ set(b))]
    for k in sorted(set(a) & set(b)):
      out += differences(a[k], b[k], f"{where}/{k}")
    return out
  if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
    return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
  return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def main(argv: list[str]) -> int:
  if len(argv) != 2:
    print(__doc__)
    return 2
  first, second = ({k: v for k, v in json.load(open(p)).items() if k not in TIMINGS}
                   for p in argv)
  found = differences(first, second)
  for line in found:
    print(line)
  print(f"{len(found)} difference(s) between {argv[0]} and {argv[1]} (timings left out)")
  return 1 if found else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
