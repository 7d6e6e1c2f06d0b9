"""``flexolmo serve`` as deployed (its own process, loopback) under bench/serve.py's bounded
load: every accepted request comes back complete, and continuous batching multiplies the
tokens per second of one request at a time."""
import json
import os
import subprocess
import sys

from flexolmo_jax.flexolmo import merge
from tests import artifacts
from tests.e2e.fixtures import user_compile_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_two_hundred_requests_32_at_once_lose_nothing_and_batching_pays(tmp_path):
  """The server runs its decoding programs thousands of times: compiled as a user's are, the
  test took 63 s of CPU instead of 95 at the suite's fast-compile options (2-core runner)."""
  tiny = artifacts.make_tiny(tmp_path)
  model = merge.merge(tiny["public"], list(tiny["experts"].values()), str(tmp_path / "merged"))
  report = tmp_path / "serve.json"
  run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "serve.py"), "--model", model,
                        "--requests", "200", "--concurrency", "32", "--max-tokens", "24",
                        "--throughput-requests", "32", "--new-tokens", "64",
                        "--json", str(report)], capture_output=True, text=True, timeout=900,
                       env={**os.environ, **user_compile_env()})
  assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
  figures = json.loads(report.read_text())
  load = figures["load"]
  assert load["complete"] == load["requests"] == 200 and load["lost"] == []
  assert 0 < load["p50_s"] <= load["p99_s"] and load["tokens_per_s"] > 0
  # One at a time against 32 at once (measured 28x with 128 tokens each on a quiet machine).
  assert figures["throughput"]["batching_gain"] >= 4, figures["throughput"]
