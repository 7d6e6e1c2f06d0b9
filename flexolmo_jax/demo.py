"""``flexolmo demo``: FlexOlmo's comparison at laptop scale on FlexMix-mini (docs/method.md §7-8).

Stages, each checkpointed in the work directory and reused on the next run (``--fresh`` starts
over); every training stage runs in its own process, and an owner's process is given only its own
data. The experts (and then the dense models) are independent, so ``jobs`` of them (``--jobs``,
default 2) run at once, each line of their output labelled with its run:

1. FlexMix-mini (``flexmix_mini/``).
2. The public model (``public/``).
3. One expert per closed domain against the frozen public model (``experts/<d>/``), and the
   canary owner's expert again with DP-SGD (``experts/<d>_dp/``, merged with the public model
   alone into ``merged_dp/``).
4. The baselines' dense models: the public model continued on each domain (``dense/<d>/``).
5. The merge of every expert (``merged/``) and its router tuned on public data (``tuned/``).
6. Model soup, BTM and BTX-lite (its router tuned on public data only) (``baselines/``).
7. Validation loss of every model on every domain, FlexOlmo with each expert opted out, and each
   expert alone with the public one (``eval/<model>.json``).
8. Training-data extraction (docs/method.md §9) of the canaries planted in one owner's data, with
   that owner's expert in and out, and with its DP-trained expert (``eval/extraction.json``).
9. The Hugging Face export of the tuned model, checked against transformers' logits (``hf/``).
10. ``report.json`` (every number), ``report.md`` (the tables) and ``report.png`` (the bars).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time

from flexolmo_jax.config import PUBLIC


@dataclasses.dataclass(frozen=True)
class Size:
  pretrain_steps: int
  expert_steps: int
  tune_steps: int
  batch: int
  seq: int
  # Router tuning is short here, so faster than the reference's 2e-3 (measured at quick size,
  # 60 steps: average loss 2.770 at 1e-2, 2.786 at 3e-2; 20 steps at 2e-3: 2.816).
  tune_lr: float = 1e-2
  # Expert dropout in router tuning (router_tune.py; not in the paper). Measured at quick size:
  # opting math out gave math 1.816 (public 1.361) after 60 steps without it, 1.476 after 200
  # steps with 0.5; the full model's average went 2.136 -> 2.121.
  tune_dropout: float = 0.5
  # The canary owner's expert once more with DP-SGD (flexolmo_jax/privacy): this epsilon at
  # delta 1e-5, documents cut to this many rows of ``seq`` tokens.
  dp_epsilon: float = 8.0
  dp_chunks: int = 2
  # Noise dominates its gradients, so a smaller step: at quick size the DP expert's legal loss
  # was 0.247 over the non-DP expert's at lr 3e-3 and 0.063 at 5e-4 (the public model: 0.051).
  dp_lr: float = 5e-4


# Quick router tuning runs 400 steps: opting math out overshot the public model by 0.201 and 0.211
# after 200 steps, 0.159 and 0.169 after 400 (seeds 1 and 2), and the full model's math loss fell
# by 0.03-0.05 (default size tunes on 3x the tokens of 200 quick steps already).
# Quick pre-training runs 1000 steps: an expert trained against a 300-step public model (public
# validation loss 1.32) memorized the canaries only to 0.85 nats per token and reached no sampled
# extraction (0/4); against 450 steps (0.87) 0.48 and 0/4; against 600 (0.69) 0.40 and 4/4 in one
# run, but 2/4, 1/4 and (CI) 0/4 in others: sampling seeds 0-3 on that last one's expert gave
# 0, 0, 0, 1 of 4. Against 1000 steps, on the same data: 4, 4, 4, 3 of 4. The FFN expert cannot
# move the frozen lm-head and norms, so a weak public model caps the probability it can give a
# memorized token (0.92 at most after 300 steps, while top-p 0.95 needs above 0.95).
SIZES = {"default": Size(500, 150, 150, 16, 256), "quick": Size(1000, 200, 400, 8, 128)}


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


def _done(path: str) -> bool:
  return os.path.exists(os.path.join(path, "manifest.json"))


class Demo:
  def __init__(self, workdir: str, size: str, seed: int = 0, jobs: int = 2):
    self.workdir, self.size_name, self.size, self.seed = workdir, size, SIZES[size], seed
    self.jobs = jobs          # training processes at once where stages are independent
    self.path = lambda *p: os.path.join(workdir, *p)
    s = self.size
    self.worked = False      # did this run do any work (else every stage was reused)
    # The training processes share JAX's persistent compilation cache (in the work directory,
    # unless JAX_COMPILATION_CACHE_DIR names another): the experts and the dense models are
    # the same programs, compiled once. Measured in the quick demo: see README.
    self.env = {"JAX_COMPILATION_CACHE_DIR": os.environ.get("JAX_COMPILATION_CACHE_DIR")
                or self.path("compile_cache")}
    # The seed of every training stage (model init, data order, router init, expert dropout).
    self.common = ["--batch-size", str(s.batch), "--seq-len", str(s.seq), "--log-every", "50",
                   "--seed", str(seed)]

  def train(self, out: str, argv: list[str], what: str) -> None:
    self.train_all([(out, argv, what)])

  def train_all(self, runs: list[tuple[str, list[str], str]]) -> None:
    """Each ``(output, argv, label)`` not finished yet, ``self.jobs`` processes at once."""
    todo = []
    for out, argv, what in runs:
      if _done(out):
        print(f"  {what}: reusing {out}")
      else:
        todo.append((what, argv))
    if todo:
      self.worked = True
      run_stages(todo, self.jobs, self.env)

  # -- 1-4: data and training -------------------------------------------------------------------
  def data(self) -> None:
    from flexolmo_jax.data import flexmix_mini

    fm_dir = self.path("flexmix_mini")
    if os.path.exists(os.path.join(fm_dir, flexmix_mini.CARD_FILE)):
      self.card = flexmix_mini.read_card(fm_dir)
      print(f"[1/10] FlexMix-mini: reusing {fm_dir} (--fresh to rebuild)")
    else:
      print(f"[1/10] FlexMix-mini: building into {fm_dir}")
      self.worked = True
      self.card = flexmix_mini.build(fm_dir, self.size_name)
    for name, info in self.card["domains"].items():
      print(f"  {name:>6}: {info['byte_tokens']['train']:,} train byte tokens")
    domains = self.card["domains"]
    self.raw = {d: info["dataset_dir"] for d, info in domains.items()}
    self.closed = [d for d in domains if d != PUBLIC]
    # A domain too small to hold validation documents (quick sizes) is trained, not evaluated.
    self.evaluable = [d for d in domains if domains[d]["documents"]["validation"] > 0]

  def public(self) -> None:
    s, run = self.size, self.path("public")
    print(f"[2/10] public model: {s.pretrain_steps} steps on the public data -> {run}/model")
    self.train(os.path.join(run, "model"), [
        "pretrain", "--model", "tiny", "--data", self.raw[PUBLIC], "--out", run,
        "--steps", str(s.pretrain_steps), "--warmup", str(s.pretrain_steps // 10), "--lr", "3e-3",
        *[f"--eval-data={d}={self.raw[d]}" for d in self.evaluable if d != PUBLIC],
        *self.common], "public model")

  def per_domain(self, command: str, directory: str, artifact: str,
                 what: str) -> list[tuple[str, list[str], str]]:
    """``command`` once per closed domain, each run given the public model and its own data."""
    s = self.size
    return [(os.path.join(self.path(directory, d), artifact), [
        command, "--public", self.path("public"), "--name", d, "--data", self.raw[d],
        "--out", self.path(directory, d), "--steps", str(s.expert_steps),
        "--warmup", str(s.expert_steps // 10), "--lr", "3e-3", *self.common], f"{what} {d}")
            for d in self.closed]

  def experts(self) -> None:
    print(f"[3/10] experts: each owner alone, {self.size.expert_steps} steps on its own data "
          f"only ({self.jobs} processes at once)")
    self.train_all(self.per_domain("train-expert", "experts", "expert", "expert")
                   + self.private_expert())
    self.merge_private_expert()

  def private_expert(self) -> list[tuple[str, list[str], str]]:
    """The canary owner's expert trained again with DP-SGD (merged with the public model alone
    by ``merge_private_expert``)."""
    info, s = self.card.get("canaries"), self.size
    self.dp_owner = info["domain"] if info else None
    if not self.dp_owner:
      return []
    run = self.dp_run()
    print(f"  and {self.dp_owner} again with DP-SGD (epsilon {s.dp_epsilon}, delta 1e-5)")
    return [(os.path.join(run, "expert"), [
        "train-expert", "--public", self.path("public"), "--name", self.dp_owner,
        "--data", self.raw[self.dp_owner], "--out", run, "--steps", str(s.expert_steps),
        "--warmup", str(s.expert_steps // 10), "--lr", str(s.dp_lr), "--dp",
        "--target-epsilon", str(s.dp_epsilon), "--delta", "1e-5",
        "--dp-chunks", str(s.dp_chunks), *self.common], f"{self.dp_owner} DP")]

  def dp_run(self) -> str:
    return self.path("experts", f"{self.dp_owner}_dp")

  def merge_private_expert(self) -> None:
    from flexolmo_jax.checkpoint import merge, store

    if not self.dp_owner:
      return
    run = self.dp_run()
    self.merged_dp = self.path("merged_dp")
    if not _done(self.merged_dp):
      self.worked = True
      merge.merge(self.path("public"), [run], self.merged_dp)
    self.dp_card = store.read_manifest(os.path.join(run, "expert"))["data_card"]["dp"]

  def dense(self) -> None:
    print(f"[4/10] baselines' dense models: the public model continued {self.size.expert_steps} "
          "steps on each domain")
    self.train_all(self.per_domain("train-dense", "dense", "model", "dense"))

  # -- 5-6: combining ---------------------------------------------------------------------------
  def tune(self, merged: str, run: str, proxy_weight: float | None = None,
           expert_dropout: float = 0.0) -> str:
    s = self.size
    self.train(os.path.join(run, "merged"), [
        "tune-router", "--merged", merged, "--data", self.raw[PUBLIC], "--out", run,
        "--steps", str(s.tune_steps), "--warmup", str(max(1, s.tune_steps // 10)),
        "--lr", str(s.tune_lr), "--expert-dropout", str(expert_dropout),
        *(["--proxy-weight", str(proxy_weight)] if proxy_weight is not None else []),
        *self.common], f"router tuning of {merged}")
    return os.path.join(run, "merged")

  def merge(self) -> None:
    from flexolmo_jax.checkpoint import merge

    print("[5/10] merge every expert, then tune the router on public data")
    self.merged = self.path("merged")
    if _done(self.merged):
      print(f"  merge: reusing {self.merged}")
    else:
      self.worked = True
      merge.merge(self.path("public"), [self.path("experts", d) for d in self.closed],
                  self.merged, top_k=1 + len(self.closed))
    self.tuned = self.tune(self.merged, self.path("tuned"), expert_dropout=self.size.tune_dropout)

  def baselines(self) -> None:
    from flexolmo_jax.eval import baselines

    print("[6/10] baselines: model soup, BTM, BTX-lite")
    dense = [os.path.join(self.path("dense", d), "model") for d in self.closed]
    out = {"soup": self.path("baselines", "soup"), "btm": self.path("baselines", "btm"),
           "btx": self.path("baselines", "btx")}
    self.worked |= not all(_done(p) for p in out.values())
    if not _done(out["soup"]):
      baselines.soup(dense, out["soup"])
    if not _done(out["btm"]):
      baselines.btm(dense, out["btm"], tau=1.0)
    if not _done(out["btx"]):
      baselines.btx(self.path("public"), dense, out["btx"], top_k=1 + len(self.closed))
    self.baseline_paths = {**out, "btx": self.tune(out["btx"], self.path("baselines", "btx_tuned"),
                                                   proxy_weight=0.0)}

  # -- 7-9: evaluation and report ---------------------------------------------------------------
  def evaluate(self) -> None:
    from flexolmo_jax import cli
    from flexolmo_jax.eval import perplexity

    print("[7/10] validation loss of every model on every domain")
    vocab = self.vocab = cli.model_vocabulary(self.path("public"))
    data = {d: list(cli.eval_batches({d: [self.raw[d]]}, vocab, self.path("eval", "data"),
                                     self.size.seq, self.size.batch)[d]) for d in self.evaluable}
    models = {"public": (self.path("public"), {}),
              **{f"dense {d}": (os.path.join(self.path("dense", d), "model"), {})
                 for d in self.closed},
              "soup": (self.baseline_paths["soup"], {}), "btm": (self.baseline_paths["btm"], {}),
              "btx": (self.baseline_paths["btx"], {}),
              "flexolmo (no router tuning)": (self.merged, {}), "flexolmo": (self.tuned, {}),
              **{f"flexolmo without {d}": (self.tuned, {"exclude": d}) for d in self.closed},
              **{f"public + {d}": (self.merged, {"experts": f"{PUBLIC},{d}"})
                 for d in self.closed},
              **({f"public + {self.dp_owner} (DP)": (self.merged_dp, {})}
                 if self.dp_owner else {})}
    self.losses = {}
    os.makedirs(self.path("eval"), exist_ok=True)
    for name, (path, select) in models.items():
      cache = self.path("eval", name.replace(" ", "_").replace(",", "") + ".json")
      if os.path.exists(cache):
        with open(cache) as fh:
          self.losses[name] = json.load(fh)
        continue
      self.worked = True
      stats = perplexity.evaluate_stats(path, data, vocab=vocab, **select)
      self.losses[name] = {d: s["loss"] for d, s in stats.items()}
      with open(cache + ".tmp", "w") as fh:
        json.dump(self.losses[name], fh)
      os.replace(cache + ".tmp", cache)
      print(f"  {name:>28}: average {_mean(self.losses[name]):.4f}")
    self.routing = self.route(data)

  def route(self, data: dict) -> dict:
    """{model: {domain: {expert: mean router probability}}} of both FlexOlmo models."""
    from flexolmo_jax.checkpoint import merge
    from flexolmo_jax.eval import routing

    cache = self.path("eval", "routing.json")
    if os.path.exists(cache):
      with open(cache) as fh:
        return json.load(fh)
    self.worked = True
    out = {}
    for name, path in (("flexolmo (no router tuning)", self.merged), ("flexolmo", self.tuned)):
      cfg, params = merge.load_merged(path)
      out[name] = {d: routing.router_probabilities(cfg, params, batches)
                   for d, batches in data.items()}
    with open(cache + ".tmp", "w") as fh:
      json.dump(out, fh)
    os.replace(cache + ".tmp", cache)
    return out

  def extraction(self) -> None:
    """The canaries' extraction rate by FlexOlmo with their owner's expert in and out, beside
    the public model, that owner's dense model, and its expert alone with the public one."""
    from flexolmo_jax.eval import extraction, perplexity

    info = self.card.get("canaries")
    self.extraction_results = {}
    if not info:
      print("[8/10] extraction: this FlexMix-mini has no canaries; skipped")
      return
    owner = info["domain"]
    cache = self.path("eval", "extraction.json")
    # The spec's 256-token spans, but never longer than the sequences the models were trained
    # on; each canary (with its EOS) fits in one, so it is tested whole, from its start.
    length = self.card["size"]["canary_bytes"]
    if length >= self.size.seq:
      raise ValueError(f"FlexMix-mini canaries of {length} bytes do not fit the demo's "
                       f"{self.size.seq}-token training sequences with their EOS; rebuild the "
                       f"data (--fresh).")
    config = extraction.ExtractionConfig(total=min(256, self.size.seq),
                                         min_length=min(128, length))
    print(f"[8/10] extraction of the {info['documents']} canaries planted in {owner}'s data "
          f"({config.samples} samples of {config.total} tokens each, similarity >= "
          f"{config.threshold})")
    if os.path.exists(cache):
      with open(cache) as fh:
        self.extraction_results = json.load(fh)
      print(f"  reusing {cache}")
      return
    self.worked = True
    vocab = self.vocab
    with open(info["path"]) as fh:
      docs = [vocab.encode(json.loads(line)["text"]) for line in fh]
    models = {"public": (self.path("public"), {}),
              f"dense {owner}": (os.path.join(self.path("dense", owner), "model"), {}),
              f"public + {owner}": (self.merged, {"experts": f"{PUBLIC},{owner}"}),
              "flexolmo": (self.tuned, {}),
              f"flexolmo without {owner}": (self.tuned, {"exclude": owner}),
              f"public + {owner} (DP)": (self.merged_dp, {})}
    results = {"owner": owner, "config": dataclasses.asdict(config), "models": {}}
    for name, (path, select) in models.items():
      cfg, params, _ = perplexity.load_model(path, **select)
      r = extraction.extraction(cfg, params, docs, config, eos_id=vocab.eos_id)
      r.pop("per_document")
      r["canary_loss"] = extraction.document_loss(cfg, params, docs, config.total)
      results["models"][name] = r
      print(f"  {name:>28}: {r['extracted']}/{r['documents']} extracted, mean best similarity "
            f"{r['mean_best_similarity']:.3f}, canary loss {r['canary_loss']:.3f}")
    with open(cache + ".tmp", "w") as fh:
      json.dump(results, fh)
    os.replace(cache + ".tmp", cache)
    self.extraction_results = results

  def export(self) -> None:
    import numpy as np

    from flexolmo_jax.checkpoint import merge
    from flexolmo_jax.convert import export
    from flexolmo_jax.model.transformer import pure_model

    print("[9/10] Hugging Face export of FlexOlmo, checked against transformers")
    out = self.path("hf")
    if not os.path.exists(os.path.join(out, "config.json")):
      export.export_hf(self.tuned, out, drop_negative_bias=True, overwrite=True)
    try:
      import torch
      from transformers import AutoModelForCausalLM
    except ImportError:
      self.hf_check = {"skipped": "transformers/torch not installed (pip install '.[hf]')"}
      print(f"  {self.hf_check['skipped']}")
      return
    ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    cfg, params = merge.load_merged(self.tuned)
    cfg = cfg.replace(negative_bias=False)
    params["blocks"]["ffn"].pop("negative_bias", None)
    toks = np.random.RandomState(0).randint(3, 259, (2, 64))
    ours = np.asarray(pure_model(cfg)(params, toks)[0])
    with torch.no_grad():
      theirs = ref(torch.as_tensor(toks)).logits.float().numpy()
    diff = float(np.max(np.abs(ours - theirs)))
    self.hf_check = {"max_abs_logit_difference": diff, "ok": diff < 1e-4,
                     "note": "exported without the negative bias; compared with the same model"}
    print(f"  transformers vs flexolmo_jax logits: max |difference| {diff:.2e}")

  def timed(self, name: str, stage) -> None:
    """Runs ``stage``; its seconds are added to timing.json's when it did any work (so a run
    that resumed after an interruption still reports the whole demo's time)."""
    worked, self.worked = self.worked, False
    start = time.perf_counter()
    stage()
    seconds = time.perf_counter() - start
    path = self.path("timing.json")
    timing = {"seconds": 0.0, "stages": {}}
    if os.path.exists(path):
      with open(path) as fh:
        timing = {"stages": {}, **json.load(fh)}
    if self.worked:
      timing["seconds"] += seconds
      timing["stages"][name] = timing["stages"].get(name, 0.0) + seconds
      with open(path + ".tmp", "w") as fh:
        json.dump(timing, fh)
      os.replace(path + ".tmp", path)
      print(f"  ({name}: {seconds:.0f} s)")
    self.worked = worked or self.worked
    self.timing = timing

  def report(self) -> dict:
    domains = self.evaluable
    table = {name: {**{d: losses[d] for d in domains}, "average": _mean(losses)}
             for name, losses in self.losses.items()}
    report = {
        "size": self.size_name, "config": dataclasses.asdict(self.size), "seed": self.seed,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "seconds": round(self.timing["seconds"], 1),
        "stage_seconds": {k: round(v, 1) for k, v in self.timing["stages"].items()},
        "domains": domains, "closed_domains": self.closed, "losses": table,
        "expert_gain": {d: {"public": table["public"][d], "public + expert": table[f"public + {d}"][d]}
                        for d in self.closed if d in domains},
        "opt_out": {d: {"flexolmo": table["flexolmo"], "without": table[f"flexolmo without {d}"]}
                    for d in self.closed},
        "routing": self.routing,
        "extraction": self.extraction_results,
        "dp": self.dp_summary(table),
        "hf_export": self.hf_check,
    }
    with open(self.path("report.json"), "w") as fh:
      json.dump(report, fh, indent=2)
    with open(self.path("report.md"), "w") as fh:
      fh.write(render_markdown(report))
    render_png(report, self.path("report.png"))
    return report


  def dp_summary(self, table: dict) -> dict:
    """The DP expert's guarantee, its validation-loss cost and its canaries, beside the non-DP
    expert's."""
    owner = self.dp_owner
    if not owner:
      return {}
    dp_name, plain = f"public + {owner} (DP)", f"public + {owner}"
    ext = (self.extraction_results or {}).get("models", {})
    keys = ("epsilon", "delta", "noise_multiplier", "clip", "sampling", "sampling_rate", "steps",
            "accountant", "router_init", "documents", "documents_cut")
    return {"owner": owner, "guarantee": {k: self.dp_card[k] for k in keys},
            "loss": {m: table[m][owner] for m in ("public", plain, dp_name)
                     if owner in table.get(m, {})},
            "extraction": {m: ext[m] for m in ("public", plain, dp_name) if m in ext}}


def _mean(losses: dict) -> float:
  return sum(losses.values()) / len(losses)


def render_markdown(report: dict) -> str:
  domains = report["domains"]
  head = "| model | " + " | ".join(domains) + " | average |\n"
  head += "|---|" + "---|" * (len(domains) + 1) + "\n"
  rows = "".join(f"| {name} | " + " | ".join(f"{v[d]:.3f}" for d in domains)
                 + f" | {v['average']:.3f} |\n" for name, v in report["losses"].items())
  hf = report["hf_export"]
  routing = ""
  for model, table in report.get("routing", {}).items():
    experts = list(next(iter(table.values())))
    routing += (f"\nMean router probability of each expert, {model}, by domain:\n\n"
                "| domain | " + " | ".join(experts) + " |\n|---|" + "---|" * len(experts) + "\n"
                + "".join(f"| {d} | " + " | ".join(f"{p[e]:.2f}" for e in experts) + " |\n"
                          for d, p in table.items()))
  ext = report.get("extraction") or {}
  if ext:
    c = ext["config"]
    extraction = (f"\nExtraction of the canaries planted in {ext['owner']}'s data ({c['samples']} "
                  f"samples per canary, {c['prefix']}-token prefix, {c['total']}-token spans, "
                  f"extracted when similarity >= {c['threshold']}; canary loss: teacher-forced, "
                  "nats per token):\n\n"
                  "| model | extracted | rate | mean best similarity | canary loss |\n"
                  "|---|---|---|---|---|\n"
                  + "".join(f"| {m} | {r['extracted']}/{r['documents']} | {r['rate']:.2f} | "
                            f"{r['mean_best_similarity']:.3f} | {r.get('canary_loss', float('nan')):.3f} |\n"
                            for m, r in ext["models"].items())
                  + f"\nThe owner's expert in and out as the paper measures it (its FlexOlmo "
                  f"with the math expert): `public + {ext['owner']}` has it in; opting it out "
                  "leaves the public expert alone, which computes the `public` model. In "
                  "`flexolmo` the router shares each canary token among all experts, so "
                  f"{ext['owner']}'s expert moves it less.\n")
  else:
    extraction = ""
  return (f"# FlexOlmo on FlexMix-mini ({report['size']} size)\n\n"
          f"Machine: {report['machine']}; the whole demo took {report['seconds']:.0f} s ("
          + ", ".join(f"{k} {v:.0f} s" for k, v in report.get("stage_seconds", {}).items())
          + ").\n\n"
          "Validation loss (nats per byte, lower is better) of every model on every domain's "
          "validation split. `dense D` is the public model continued on D; `public + D` is the "
          "merged model opted in to the public expert and D's only; `flexolmo without D` has D "
          "opted out.\n\n" + head + rows + routing + extraction + render_dp(report.get("dp")) +
          f"\nHugging Face export: {json.dumps(hf)}\n")


def render_dp(dp: dict | None) -> str:
  """The DP row: the owner's expert with and without DP-SGD, its loss cost and its canaries."""
  if not dp:
    return ""
  g, owner = dp["guarantee"], dp["owner"]
  plain, private = f"public + {owner}", f"public + {owner} (DP)"
  lines = (f"\nDifferential privacy: {owner}'s expert trained again with DP-SGD, epsilon "
           f"{g['epsilon']:.2f} at delta {g['delta']:g} ({g['accountant']} accountant, "
           f"{g['sampling']} sampling q={g['sampling_rate']:.3f} over {g['documents']} documents, "
           f"noise multiplier {g['noise_multiplier']:.3f}, clip {g['clip']:g}, {g['steps']} steps, "
           f"router {g['router_init']}). A document is the privacy unit; a canary planted in "
           f"k copies is protected only at group size k.\n\n"
           f"| model | {owner} validation loss | loss vs {plain} | canaries extracted | "
           "mean best similarity | canary loss |\n|---|---|---|---|---|---|\n")
  base = dp["loss"].get(plain)
  for name in ("public", plain, private):
    loss = dp["loss"].get(name)
    ext = dp["extraction"].get(name, {})
    cost = f"{loss - base:+.3f}" if loss is not None and base is not None else "-"
    lines += (f"| {name} | {loss:.3f} | {cost} | {ext.get('extracted', '-')}/"
              f"{ext.get('documents', '-')} | {ext.get('mean_best_similarity', float('nan')):.3f} | "
              f"{ext.get('canary_loss', float('nan')):.3f} |\n")
  return lines


# The methods drawn in report.png (a row of report["losses"] each), in this order.
PLOTTED = ("public", "soup", "btm", "btx", "flexolmo (no router tuning)", "flexolmo")


def render_png(report: dict, path: str) -> None:
  """Per-domain bars (and the average) of validation loss for each method."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  columns = report["domains"] + ["average"]
  methods = [m for m in PLOTTED if m in report["losses"]]
  width = 0.8 / len(methods)
  fig, ax = plt.subplots(figsize=(10, 4.5))
  x = np.arange(len(columns))
  for i, m in enumerate(methods):
    ax.bar(x + (i - (len(methods) - 1) / 2) * width, [report["losses"][m][c] for c in columns],
           width, label=m)
  ax.set_xticks(x, columns)
  ax.set_ylabel("validation loss (nats per byte)")
  ax.set_title(f"FlexOlmo on FlexMix-mini ({report['size']} size): lower is better")
  ax.legend(fontsize=8, ncol=3)
  fig.tight_layout()
  fig.savefig(path + ".tmp.png", dpi=100)
  plt.close(fig)
  os.replace(path + ".tmp.png", path)


def run(workdir: str, quick: bool = False, fresh: bool = False, seed: int = 0,
        jobs: int = 2) -> dict:
  if jobs < 1:
    raise ValueError(f"--jobs {jobs}: at least one training process is needed.")
  if fresh:
    shutil.rmtree(workdir, ignore_errors=True)
  demo = Demo(workdir, "quick" if quick else "default", seed, jobs)
  for name in ("data", "public", "experts", "dense", "merge", "baselines", "evaluate",
               "extraction", "export"):
    demo.timed(name, getattr(demo, name))
  print("[10/10] report")
  report = demo.report()
  print(render_markdown(report))
  print(f"report -> {demo.path('report.md')}, {demo.path('report.json')}, "
        f"{demo.path('report.png')}")
  return report
