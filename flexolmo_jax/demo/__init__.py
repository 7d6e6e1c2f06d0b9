"""``flexolmo demo``: FlexOlmo's comparison at laptop scale on FlexMix-mini (docs/method.md §7-8).

Stages, each checkpointed in the work directory and reused on the next run while the inputs it
was built from are the same (``provenance.json``, demo/provenance.py: a model trained or tuned
again makes every output built from it stale, and it is built again); ``--fresh`` starts over.
The directory records the size and seed it was built with (``demo_settings.json``), and a
run that asks for others is refused rather than reusing models built otherwise. Every training
stage runs in its own process, and an owner's process is given only its own data. The experts
(and then the dense models) are independent, so ``jobs`` of them (``--jobs``, default 2) run at
once, each line of their output labelled with its run:

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

With ``ablations`` (``--ablations``), after stage 7: the paper's ablations, each trained, merged,
tuned and evaluated like FlexOlmo itself (demo/ablations.py, ``ablations/``).
"""
from __future__ import annotations

import shutil

from flexolmo_jax.demo.ablations import Ablations
from flexolmo_jax.demo.evaluation import Evaluation
from flexolmo_jax.demo.processes import run_stages
from flexolmo_jax.demo.report import Report, render_markdown
from flexolmo_jax.demo.sizes import claim_workdir
from flexolmo_jax.demo.training import Training

__all__ = ["Demo", "run", "run_stages"]


class Demo(Training, Evaluation, Ablations, Report):
  """The demo in a work directory: each stage reads the models and results earlier stages
  left there (or in this object) and is skipped when its output exists."""


def run(workdir: str, quick: bool = False, fresh: bool = False, seed: int = 0,
        jobs: int = 2, ablations: bool = False) -> dict:
  if jobs < 1:
    raise ValueError(f"--jobs {jobs}: at least one training process is needed.")
  if fresh:
    shutil.rmtree(workdir, ignore_errors=True)
  size = "quick" if quick else "default"
  claim_workdir(workdir, size, seed)
  demo = Demo(workdir, size, seed, jobs, ablations)
  for name, stage in (("data", demo.data), ("public", demo.public), ("experts", demo.experts),
                      ("dense", demo.dense), ("merge", demo.merge), ("baselines", demo.baselines),
                      ("evaluate", demo.evaluate), ("ablations", demo.ablations),
                      ("extraction", demo.extraction),
                      ("export", demo.export)):
    demo.timed(name, stage)
  print("[10/10] report")
  report = demo.report()
  print(render_markdown(report))
  print(f"report -> {demo.path('report.md')}, {demo.path('report.json')}, "
        f"{demo.path('report.png')}")
  return report
