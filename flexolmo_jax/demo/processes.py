"""Training stages in processes of their own: an owner's expert never shares a process with
another, and independent stages run ``jobs`` at once."""
from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import threading


def run_stages(stages: list[tuple[str, list[str]]], jobs: int = 1,
               env: dict[str, str] | None = None) -> None:
  """Each ``(label, argv)`` in its own process (an owner's expert never shares a process with
  another), at most ``jobs`` at once, with ``env`` added to this process's environment. When
  several run at once, each output line is prefixed with its stage's label. Every stage is
  waited for; then any failure is raised, naming its stages."""
  lock = threading.Lock()

  def one(label: str, argv: list[str]) -> int:
    with lock:
      print(f"  $ flexolmo {' '.join(argv)}", flush=True)
    proc = subprocess.Popen([sys.executable, "-m", "flexolmo_jax.cli", *argv],
                            env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    prefix = f"  [{label}] " if jobs > 1 and len(stages) > 1 else ""
    for line in proc.stdout:
      with lock:
        print(prefix + line, end="", flush=True)
    return proc.wait()

  with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
    codes = list(pool.map(lambda stage: one(*stage), stages))
  failed = [f"{label} (`flexolmo {argv[0]}`, exit status {code})"
            for (label, argv), code in zip(stages, codes) if code]
  if failed:
    raise ValueError(f"demo stage failed: {', '.join(failed)}; re-run `make demo` to resume.")


def done(path: str) -> bool:
  return os.path.exists(os.path.join(path, "manifest.json"))


def write_json(path: str, value, **dump_kw) -> None:
  """``value`` as JSON at ``path``, whole or not at all (a stage's record or cached result)."""
  with open(path + ".tmp", "w") as fh:
    json.dump(value, fh, **dump_kw)
  os.replace(path + ".tmp", path)
