"""The demo's stages 1-6: FlexMix-mini, the public model, the experts (one process each), the
dense models, the merge with its router tuning, and the baselines."""
from __future__ import annotations

import json
import os
import time

from flexolmo_jax.demo.processes import done, run_stages, write_json
from flexolmo_jax.demo.provenance import Provenance
from flexolmo_jax.demo.sizes import EXPERT_FLAGS, SIZES
from flexolmo_jax.experts import PUBLIC


class Training:
  """Stages 1-6: the data, every training run and every combination of models."""

  def __init__(self, workdir: str, size: str, seed: int = 0, jobs: int = 2,
               ablations: bool = False):
    self.workdir, self.size_name, self.size, self.seed = workdir, size, SIZES[size], seed
    self.jobs = jobs          # training processes at once where stages are independent
    self.with_ablations = ablations   # run the ablation stage (demo/ablations.py)
    self.path = lambda *p: os.path.join(workdir, *p)
    self.provenance = Provenance(workdir)     # what each reused output was built from
    s = self.size
    self.worked = False      # did this run do any work (else every stage was reused)
    # The training processes share JAX's persistent compilation cache (in the work directory,
    # unless JAX_COMPILATION_CACHE_DIR names another): the experts and the dense models are
    # the same programs, compiled once. Every program is kept, also those that compile in under
    # JAX's default second: a quick-size expert compiles 17, and with them cached its process
    # takes 7 s of CPU instead of 10 (docs/results.md).
    self.env = {"JAX_COMPILATION_CACHE_DIR": os.environ.get("JAX_COMPILATION_CACHE_DIR")
                or self.path("compile_cache"),
                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": os.environ.get(
                    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")}
    # The seed of every training stage (model init, data order, router init, expert dropout).
    self.common = ["--batch-size", str(s.batch), "--seq-len", str(s.seq), "--log-every", "50",
                   "--seed", str(seed)]

  def train(self, out: str, argv: list[str], what: str, inputs: list[str]) -> None:
    self.train_all([(out, argv, what, inputs)])

  def train_all(self, runs: list[tuple[str, list[str], str, list[str]]]) -> None:
    """Each ``(output, argv, label, inputs)`` not built yet from these inputs (models and files
    the run reads), ``self.jobs`` processes at once. A stale output is removed with its run
    directory (the output's parent, which holds the checkpoints a run resumes from)."""
    todo = []
    for out, argv, what, inputs in runs:
      digests = self.provenance.inputs(*inputs)
      if self.reusable(out, digests, directory=os.path.dirname(out)):
        print(f"  {what}: reusing {out}")
      else:
        todo.append((out, what, argv, digests))
    if todo:
      self.worked = True
      try:
        run_stages([(what, argv) for _, what, argv, _ in todo], self.jobs, self.env)
      finally:                      # the runs that finished, also when another one failed
        for out, _, _, digests in todo:
          if done(out):
            self.provenance.record(out, digests)

  def reusable(self, output: str, inputs: dict[str, str], directory: str | None = None) -> bool:
    """Whether ``output`` (a saved model or a file) exists and was built from ``inputs``
    (``Provenance.inputs``). A stale one is removed, with ``directory`` if given."""
    if not (done(output) or os.path.isfile(output)):
      return False
    changed = self.provenance.changed(output, inputs)
    if changed:
      self.provenance.remove_stale(output, directory or output, changed)
    return not changed

  def card_file(self) -> str:
    from flexolmo_jax.data import flexmix_mini

    return self.path("flexmix_mini", flexmix_mini.CARD_FILE)

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
        *self.common], "public model", [self.card_file()])

  def per_domain(self, command: str, directory: str, artifact: str,
                 what: str) -> list[tuple[str, list[str], str, list[str]]]:
    """``command`` once per closed domain, each run given the public model and its own data."""
    s = self.size
    return [(os.path.join(self.path(directory, d), artifact), [
        command, "--public", self.path("public"), "--name", d, "--data", self.raw[d],
        "--out", self.path(directory, d), "--steps", str(s.expert_steps),
        "--warmup", str(s.expert_steps // 10), "--lr", "3e-3", *self.common], f"{what} {d}",
             [self.path("public"), self.card_file()]) for d in self.closed]

  def experts(self) -> None:
    print(f"[3/10] experts: each owner alone, {self.size.expert_steps} steps on its own data "
          f"only ({self.jobs} processes at once)")
    # The DP run, the longest, starts first: the others share the second process slot.
    self.train_all(self.private_expert()
                   + [(out, [*argv, *EXPERT_FLAGS], what, inputs) for out, argv, what, inputs
                      in self.per_domain("train-expert", "experts", "expert", "expert")])
    self.merge_private_expert()

  def private_expert(self) -> list[tuple[str, list[str], str, list[str]]]:
    """The canary owner's expert trained again with DP-SGD (merged with the public model alone
    by ``merge_private_expert``)."""
    info, s = self.card.get("canaries"), self.size
    self.dp_owner = info["domain"] if info else None
    if not self.dp_owner:
      return []
    run = self.dp_run()
    print(f"  and {self.dp_owner} again with DP-SGD (epsilon {s.dp_epsilon}, delta 1e-5)")
    steps = s.dp_steps or s.expert_steps
    return [(os.path.join(run, "expert"), [
        "train-expert", "--public", self.path("public"), "--name", self.dp_owner,
        "--data", self.raw[self.dp_owner], "--out", run, "--steps", str(steps),
        "--warmup", str(steps // 10), "--lr", str(s.dp_lr), "--dp",
        "--target-epsilon", str(s.dp_epsilon), "--delta", "1e-5",
        "--dp-chunks", str(s.dp_chunks), *self.common], f"{self.dp_owner} DP",
             [self.path("public"), self.card_file()])]

  def dp_run(self) -> str:
    return self.path("experts", f"{self.dp_owner}_dp")

  def merge_private_expert(self) -> None:
    from flexolmo_jax.checkpoint import store
    from flexolmo_jax.flexolmo import merge

    if not self.dp_owner:
      return
    run = self.dp_run()
    self.merged_dp = self.path("merged_dp")
    inputs = self.provenance.inputs(self.path("public"), run)
    if not self.reusable(self.merged_dp, inputs):
      self.worked = True
      merge.merge(self.path("public"), [run], self.merged_dp)
      self.provenance.record(self.merged_dp, inputs)
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
        "--interpolation", str(s.tune_interpolation),
        *(["--proxy-weight", str(proxy_weight)] if proxy_weight is not None else []),
        *self.common], f"router tuning of {merged}", [merged, self.card_file()])
    return os.path.join(run, "merged")

  def merge(self) -> None:
    from flexolmo_jax.flexolmo import merge

    print("[5/10] merge every expert, then tune the router on public data")
    self.merged = self.path("merged")
    experts = [self.path("experts", d) for d in self.closed]
    inputs = self.provenance.inputs(self.path("public"), *experts)
    if self.reusable(self.merged, inputs):
      print(f"  merge: reusing {self.merged}")
    else:
      self.worked = True
      merge.merge(self.path("public"), experts, self.merged, top_k=1 + len(self.closed),
                  expert_bias=self.size.expert_bias)
      self.provenance.record(self.merged, inputs)
    self.tuned = self.tune(self.merged, self.path("tuned"), expert_dropout=self.size.tune_dropout)

  def baselines(self) -> None:
    from flexolmo_jax.baselines import btm, btx, soup

    print("[6/10] baselines: model soup, BTM, BTX-lite")
    dense = [os.path.join(self.path("dense", d), "model") for d in self.closed]
    out = {"soup": self.path("baselines", "soup"), "btm": self.path("baselines", "btm"),
           "btx": self.path("baselines", "btx")}
    build = {"soup": lambda: soup.soup(dense, out["soup"]),
             "btm": lambda: btm.btm(dense, out["btm"], tau=1.0),
             "btx": lambda: btx.btx(self.path("public"), dense, out["btx"],
                                    top_k=1 + len(self.closed))}
    for name, make in build.items():
      inputs = self.provenance.inputs(*([self.path("public")] if name == "btx" else []), *dense)
      if not self.reusable(out[name], inputs):
        self.worked = True
        make()
        self.provenance.record(out[name], inputs)
    self.baseline_paths = {**out, "btx": self.tune(out["btx"], self.path("baselines", "btx_tuned"),
                                                   proxy_weight=0.0)}

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
      write_json(path, timing)
      print(f"  ({name}: {seconds:.0f} s)")
    self.worked = worked or self.worked
    self.timing = timing
