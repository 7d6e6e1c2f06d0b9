"""What the memory benchmarks share: inputs built in a child process, measured children.

A forked or spawned child's peak RSS is its own, so the process that builds the inputs (holding
whole models) is never the one measured.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def parser(doc: str, experts: int, workdir: str) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=doc.split("\n")[0])
  p.add_argument("--experts", type=int, default=experts)
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--workdir", default=workdir)
  p.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
  return p


def build_in_child(script: str, args: argparse.Namespace) -> None:
  subprocess.run([sys.executable, script, "--build-only", "--experts", str(args.experts),
                  "--workdir", args.workdir], check=True)


def run_child(code: str, *argv: str) -> dict:
  """Runs ``python -c code argv...`` and returns the JSON its last output line holds."""
  os.sync()   # no write-back of an earlier step competes with this one
  done = subprocess.run([sys.executable, "-c", code, *argv], check=True, capture_output=True,
                        text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  return json.loads(done.stdout.strip().splitlines()[-1])
