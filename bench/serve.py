"""``flexolmo serve`` under load, on loopback only, bounded in count and time.

    python bench/serve.py --model runs/tuned                      # load test + throughput
    python bench/serve.py --model runs/tuned --hf hf/flexolmo     # and against transformers

Load test: ``--requests`` completions (default 200), ``--concurrency`` at once (32), each with
its own expert choice, sampled or greedy; every accepted request must come back complete (its
``max_tokens``, or a stop at end of text). Prints p50/p99 latency and tokens/s.

Throughput: 32 greedy requests of 128 new tokens (end of text ignored, so every request makes
all of them), sent one at a time, then all at once; the ratio is the gain of continuous
batching. With ``--hf``, transformers' batched ``generate`` on the exported checkpoint makes
the same tokens (left-padded prompts, greedy) in the same process. ``--json`` writes it all.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHOICES = [{}, {"exclude": ["public"]}, {"experts": ["public", "code"]}, {"exclude": ["math"]},
           {"experts": ["public"]}]
PROMPTS = ["def main(", "The court held that", "Let x be a prime number", "Once upon a time",
           "import numpy as np\n", "Theorem 1.", "The licensee shall", "In the morning"]


def post(url: str, body: dict, timeout: float) -> dict:
  req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                               headers={"content-type": "application/json"})
  with urllib.request.urlopen(req, timeout=timeout) as r:
    return json.loads(r.read())


class Served:
  """``flexolmo serve --model MODEL`` in a process of its own on a free loopback port, as it is
  deployed (the clients of this script then take no time from the server's own threads):
  ``with Served(model, slots) as url: ...``."""

  def __init__(self, model: str, slots: int, timeout: float = 600):
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      self.port = s.getsockname()[1]
    self.url = f"http://127.0.0.1:{self.port}"
    self.argv = [sys.executable, "-m", "flexolmo_jax.cli", "serve", "--model", model,
                 "--port", str(self.port), "--slots", str(slots)]
    self.timeout = timeout

  def __enter__(self) -> str:
    self.log = tempfile.TemporaryFile("w+")
    self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT)
    deadline = time.time() + self.timeout
    while time.time() < deadline:
      if self.proc.poll() is not None:
        raise RuntimeError(f"`flexolmo serve` exited with {self.proc.returncode}:\n"
                           f"{self._output()}")
      try:
        with urllib.request.urlopen(self.url + "/health", timeout=1):
          return self.url
      except OSError:
        time.sleep(0.2)
    self.__exit__()
    raise TimeoutError(f"`flexolmo serve` did not answer in {self.timeout} s:\n{self._output()}")

  def _output(self) -> str:
    self.log.seek(0)
    return self.log.read()[-3000:]

  def __exit__(self, *exc) -> None:
    self.proc.send_signal(signal.SIGINT)
    try:
      self.proc.wait(30)
    except subprocess.TimeoutExpired:
      self.proc.kill()
    self.log.close()


def experts_of(url: str) -> list[str]:
  with urllib.request.urlopen(url + "/v1/experts") as r:
    return [e["name"] for e in json.loads(r.read())["data"]]


def load_test(url: str, names, n: int, concurrency: int, max_tokens: int, timeout: float,
              seed: int = 0) -> dict:
  rs = np.random.RandomState(seed)
  choices = [c for c in CHOICES if all(x in names for v in c.values() for x in v)]
  bodies = [{"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": int(rs.randint(1, max_tokens + 1)),
             "temperature": float(rs.choice([0.0, 0.8])), "seed": i,
             **choices[i % len(choices)]} for i in range(n)]

  def one(body):
    t0 = time.perf_counter()
    answer = post(url, body, timeout)
    return time.perf_counter() - t0, answer

  t0 = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
    results = list(pool.map(one, bodies))
  wall = time.perf_counter() - t0
  lost = [i for i, (body, (_, a)) in enumerate(zip(bodies, results))
          if a["choices"][0]["finish_reason"] not in ("stop", "length")
          or (a["choices"][0]["finish_reason"] == "length"
              and a["usage"]["completion_tokens"] != body["max_tokens"])]
  latency = np.asarray([t for t, _ in results])
  tokens = sum(a["usage"]["completion_tokens"] for _, a in results)
  return {"requests": n, "concurrency": concurrency, "complete": n - len(lost), "lost": lost,
          "p50_s": float(np.percentile(latency, 50)), "p99_s": float(np.percentile(latency, 99)),
          "tokens": tokens, "tokens_per_s": tokens / wall, "wall_s": wall}


def throughput(url: str, n: int, new_tokens: int, timeout: float) -> dict:
  bodies = [{"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": new_tokens, "temperature": 0,
             "ignore_eos": True} for i in range(n)]
  t0 = time.perf_counter()
  serial = [post(url, b, timeout) for b in bodies]
  one_at_a_time = time.perf_counter() - t0
  t0 = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(n) as pool:
    together = list(pool.map(lambda b: post(url, b, timeout), bodies))
  batched = time.perf_counter() - t0
  tokens = sum(a["usage"]["completion_tokens"] for a in together)
  assert tokens == n * new_tokens and [a["choices"][0]["text"] for a in serial] == \
      [a["choices"][0]["text"] for a in together], "batched answers differ from one-at-a-time"
  return {"requests": n, "new_tokens": new_tokens,
          "one_at_a_time_tokens_per_s": tokens / one_at_a_time,
          "batched_tokens_per_s": tokens / batched, "batching_gain": one_at_a_time / batched}


def transformers_throughput(hf: str, n: int, new_tokens: int) -> dict:
  """transformers' batched greedy ``generate`` of the same prompts on the exported model."""
  import torch
  import transformers

  tok = transformers.AutoTokenizer.from_pretrained(hf)
  tok.padding_side = "left"
  if tok.pad_token is None:
    tok.pad_token = tok.eos_token
  model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
  batch = tok([PROMPTS[i % len(PROMPTS)] for i in range(n)], return_tensors="pt", padding=True)
  kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                pad_token_id=tok.pad_token_id)
  with torch.inference_mode():
    model.generate(**{k: v[:2] for k, v in batch.items()}, max_new_tokens=4, do_sample=False,
                   pad_token_id=tok.pad_token_id)                        # warm-up
    t0 = time.perf_counter()
    out = model.generate(**batch, **kwargs)
    wall = time.perf_counter() - t0
  made = (out.shape[1] - batch["input_ids"].shape[1]) * n
  return {"tokens_per_s": made / wall, "wall_s": wall, "torch_threads": torch.get_num_threads()}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", required=True, help="a saved model (merged for expert choices)")
  p.add_argument("--hf", help="its Hugging Face export, to compare with transformers")
  p.add_argument("--slots", type=int, default=32)
  p.add_argument("--requests", type=int, default=200)
  p.add_argument("--concurrency", type=int, default=32)
  p.add_argument("--max-tokens", type=int, default=32, help="load test: 1..this many each")
  p.add_argument("--new-tokens", type=int, default=128, help="throughput: tokens per request")
  p.add_argument("--throughput-requests", type=int, default=32)
  p.add_argument("--skip-throughput", action="store_true")
  p.add_argument("--timeout", type=float, default=600, help="seconds per request, at most")
  p.add_argument("--json", help="write the figures here")
  args = p.parse_args(argv)
  report = {"model": args.model, "slots": args.slots}
  with Served(args.model, args.slots) as url:
    report["load"] = r = load_test(url, experts_of(url), args.requests, args.concurrency,
                                   args.max_tokens, args.timeout)
    print(f"load: {r['complete']}/{r['requests']} complete, {r['concurrency']} concurrent; "
          f"latency p50 {r['p50_s']:.3f} s, p99 {r['p99_s']:.3f} s; "
          f"{r['tokens_per_s']:.0f} tokens/s")
    if not args.skip_throughput:
      report["throughput"] = t = throughput(url, args.throughput_requests, args.new_tokens,
                                            args.timeout)
      print(f"throughput, {t['requests']} requests x {t['new_tokens']} tokens: one at a time "
            f"{t['one_at_a_time_tokens_per_s']:.0f} tokens/s, all at once "
            f"{t['batched_tokens_per_s']:.0f} tokens/s: {t['batching_gain']:.2f}x")
  if args.hf and not args.skip_throughput:
    report["transformers"] = h = transformers_throughput(args.hf, args.throughput_requests,
                                                         args.new_tokens)
    ratio = report["throughput"]["batched_tokens_per_s"] / h["tokens_per_s"]
    report["serve_over_transformers"] = ratio
    print(f"transformers batched generate: {h['tokens_per_s']:.0f} tokens/s; serve / "
          f"transformers {ratio:.2f}x")
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(report, fh, indent=1)
  return 1 if report["load"]["lost"] else 0


if __name__ == "__main__":
  sys.exit(main())
