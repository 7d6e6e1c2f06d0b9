"""``flexolmo demo``: FlexOlmo's comparison at laptop scale on FlexMix-mini (spec sections 7, 8).

Stages, each checkpointed in the work directory and reused on the next run (``--fresh`` starts
over); every training stage runs in its own process, and an owner's process is given only its own
data:

1. FlexMix-mini (``flexmix_mini/``).
2. The public model (``public/``).
3. One expert per closed domain against the frozen public model (``experts/<d>/``).
4. The baselines' dense models: the public model continued on each domain (``dense/<d>/``).
5. The merge of every expert (``merged/``) and its router tuned on public data (``tuned/``).
6. Model soup, BTM and BTX-lite (its router tuned on public data only) (``baselines/``).
7. Validation loss of every model on every domain, FlexOlmo with each expert opted out, and each
   expert alone with the public one (``eval/<model>.json``).
8. The Hugging Face export of the tuned model, checked against transformers' logits (``hf/``).
9. ``report.json`` (every number) and ``report.md`` (the tables).
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import time

from flexolmo_jax.config import PUBLIC


@dataclasses.dataclass(frozen=True)
class Size:
  pretrain_steps: int
  expert_steps: int
  tune_steps: int
  batch: int
  seq: int


SIZES = {"default": Size(600, 300, 200, 16, 256), "quick": Size(100, 80, 20, 8, 128)}


def run_stage(argv: list[str]) -> None:
  """One stage in its own process (an owner's expert never shares a process with another)."""
  print("  $ flexolmo " + " ".join(argv), flush=True)
  code = subprocess.call([sys.executable, "-m", "flexolmo_jax.cli", *argv],
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
  if code:
    raise ValueError(f"demo stage `flexolmo {argv[0]}` failed with exit status {code}; "
                     "re-run `make demo` to resume it.")


def _done(path: str) -> bool:
  return os.path.exists(os.path.join(path, "manifest.json"))


class Demo:
  def __init__(self, workdir: str, size: str):
    self.workdir, self.size_name, self.size = workdir, size, SIZES[size]
    self.path = lambda *p: os.path.join(workdir, *p)
    s = self.size
    self.worked = False      # did this run do any work (else every stage was reused)
    self.common = ["--batch-size", str(s.batch), "--seq-len", str(s.seq), "--log-every", "50"]

  def train(self, out: str, argv: list[str], what: str) -> None:
    if _done(out):
      print(f"  {what}: reusing {out}")
    else:
      self.worked = True
      run_stage(argv)

  # -- 1-4: data and training -------------------------------------------------------------------
  def data(self) -> None:
    from flexolmo_jax.data import flexmix_mini

    fm_dir = self.path("flexmix_mini")
    card_path = os.path.join(fm_dir, "flexmix_mini.json")
    if os.path.exists(card_path):
      with open(card_path) as fh:
        self.card = json.load(fh)
      print(f"[1/9] FlexMix-mini: reusing {fm_dir} (--fresh to rebuild)")
    else:
      print(f"[1/9] FlexMix-mini: building into {fm_dir}")
      self.worked = True
      self.card = flexmix_mini.build(fm_dir, self.size_name)
    for name, info in self.card["domains"].items():
      print(f"  {name:>6}: {info['byte_tokens']['train']:,} train byte tokens")
    domains = self.card["domains"]
    self.raw = {d: os.path.join(fm_dir, "tfds", f"flexmix_{d}", "1.0.0") for d in domains}
    self.closed = [d for d in domains if d != PUBLIC]
    # A domain too small to hold validation documents (quick sizes) is trained, not evaluated.
    self.evaluable = [d for d in domains if domains[d]["documents"]["validation"] > 0]

  def public(self) -> None:
    s, run = self.size, self.path("public")
    print(f"[2/9] public model: {s.pretrain_steps} steps on the public data -> {run}/model")
    self.train(os.path.join(run, "model"), [
        "pretrain", "--model", "tiny", "--data", self.raw[PUBLIC], "--out", run,
        "--steps", str(s.pretrain_steps), "--warmup", str(s.pretrain_steps // 10), "--lr", "3e-3",
        *[f"--eval-data={d}={self.raw[d]}" for d in self.evaluable if d != PUBLIC],
        *self.common], "public model")

  def per_domain(self, command: str, directory: str, artifact: str, what: str) -> None:
    """``command`` once per closed domain, each run given the public model and its own data."""
    s = self.size
    for d in self.closed:
      run = self.path(directory, d)
      self.train(os.path.join(run, artifact), [
          command, "--public", self.path("public"), "--name", d, "--data", self.raw[d],
          "--out", run, "--steps", str(s.expert_steps), "--warmup", str(s.expert_steps // 10),
          "--lr", "3e-3", *self.common], f"{what} {d}")

  def experts(self) -> None:
    print(f"[3/9] experts: each owner alone, {self.size.expert_steps} steps on its own data only")
    self.per_domain("train-expert", "experts", "expert", "expert")

  def dense(self) -> None:
    print(f"[4/9] baselines' dense models: the public model continued {self.size.expert_steps} "
          "steps on each domain")
    self.per_domain("train-dense", "dense", "model", "dense")

  # -- 5-6: combining ---------------------------------------------------------------------------
  def tune(self, merged: str, run: str, proxy_weight: float | None = None) -> str:
    s = self.size
    self.train(os.path.join(run, "merged"), [
        "tune-router", "--merged", merged, "--data", self.raw[PUBLIC], "--out", run,
        "--steps", str(s.tune_steps), "--warmup", str(max(1, s.tune_steps // 10)),
        *(["--proxy-weight", str(proxy_weight)] if proxy_weight is not None else []),
        *self.common], f"router tuning of {merged}")
    return os.path.join(run, "merged")

  def merge(self) -> None:
    from flexolmo_jax.checkpoint import merge

    print("[5/9] merge every expert, then tune the router on public data")
    self.merged = self.path("merged")
    if _done(self.merged):
      print(f"  merge: reusing {self.merged}")
    else:
      self.worked = True
      merge.merge(self.path("public"), [self.path("experts", d) for d in self.closed],
                  self.merged, top_k=1 + len(self.closed))
    self.tuned = self.tune(self.merged, self.path("tuned"))

  def baselines(self) -> None:
    from flexolmo_jax.eval import baselines

    print("[6/9] baselines: model soup, BTM, BTX-lite")
    dense = [os.path.join(self.path("dense", d), "model") for d in self.closed]
    out = {"soup": self.path("baselines", "soup"), "btm": self.path("baselines", "btm"),
           "btx": self.path("baselines", "btx")}
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

    print("[7/9] validation loss of every model on every domain")
    vocab = cli.model_vocabulary(self.path("public"))
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
                 for d in self.closed}}
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

  def export(self) -> None:
    import numpy as np

    from flexolmo_jax.checkpoint import merge
    from flexolmo_jax.convert import export
    from flexolmo_jax.model.transformer import pure_model

    print("[8/9] Hugging Face export of FlexOlmo, checked against transformers")
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

  def elapsed(self, seconds: float) -> float:
    """The demo's total time: this run's, added to earlier runs' when they left work undone."""
    path = self.path("timing.json")
    total = 0.0
    if os.path.exists(path):
      with open(path) as fh:
        total = json.load(fh)["seconds"]
    if self.worked:
      total += seconds
      with open(path, "w") as fh:
        json.dump({"seconds": total}, fh)
    return total

  def report(self, seconds: float) -> dict:
    domains = self.evaluable
    table = {name: {**{d: losses[d] for d in domains}, "average": _mean(losses)}
             for name, losses in self.losses.items()}
    report = {
        "size": self.size_name, "config": dataclasses.asdict(self.size),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "seconds": round(self.elapsed(seconds), 1),
        "domains": domains, "closed_domains": self.closed, "losses": table,
        "expert_gain": {d: {"public": table["public"][d], "public + expert": table[f"public + {d}"][d]}
                        for d in self.closed if d in domains},
        "opt_out": {d: {"flexolmo": table["flexolmo"], "without": table[f"flexolmo without {d}"]}
                    for d in self.closed},
        "hf_export": self.hf_check,
    }
    with open(self.path("report.json"), "w") as fh:
      json.dump(report, fh, indent=2)
    with open(self.path("report.md"), "w") as fh:
      fh.write(render_markdown(report))
    return report


def _mean(losses: dict) -> float:
  return sum(losses.values()) / len(losses)


def render_markdown(report: dict) -> str:
  domains = report["domains"]
  head = "| model | " + " | ".join(domains) + " | average |\n"
  head += "|---|" + "---|" * (len(domains) + 1) + "\n"
  rows = "".join(f"| {name} | " + " | ".join(f"{v[d]:.3f}" for d in domains)
                 + f" | {v['average']:.3f} |\n" for name, v in report["losses"].items())
  hf = report["hf_export"]
  return (f"# FlexOlmo on FlexMix-mini ({report['size']} size)\n\n"
          f"Machine: {report['machine']}; the whole demo took {report['seconds']:.0f} s.\n\n"
          "Validation loss (nats per byte, lower is better) of every model on every domain's "
          "validation split. `dense D` is the public model continued on D; `public + D` is the "
          "merged model opted in to the public expert and D's only; `flexolmo without D` has D "
          "opted out.\n\n" + head + rows +
          f"\nHugging Face export: {json.dumps(hf)}\n")


def run(workdir: str, quick: bool = False, fresh: bool = False) -> dict:
  if fresh:
    shutil.rmtree(workdir, ignore_errors=True)
  start = time.perf_counter()
  demo = Demo(workdir, "quick" if quick else "default")
  demo.data()
  demo.public()
  demo.experts()
  demo.dense()
  demo.merge()
  demo.baselines()
  demo.evaluate()
  demo.export()
  print("[9/9] report")
  report = demo.report(time.perf_counter() - start)
  print(render_markdown(report))
  print(f"report -> {demo.path('report.md')}, {demo.path('report.json')}")
  return report
