"""``flexolmo demo --ablations``: the paper's ablations at demo scale (docs/method.md §8).

Each ablation changes one thing of the demo's FlexOlmo and goes through the same merge, router
tuning and evaluation; the table holds each one's average validation loss untuned and tuned:

- ``no negative bias``: the owners train with no negative bias (``--no-negative-bias``), and the
  merge adds none.
- ``random router init``: the reference's fallback init, the router trained with the expert.
- ``uncoordinated``: each owner trains alone, without the frozen public expert beside it (the
  dense models of the baselines), and the FFNs merge as BTX does; tuned on public data only
  (no domain embeddings to pick proxies with).
"""
from __future__ import annotations

import os

from flexolmo_jax.demo.report import mean
from flexolmo_jax.demo.sizes import EXPERT_FLAGS

# name -> (train-expert flags in place of the demo's EXPERT_FLAGS, expert bias of the merge;
# None: the size's, as FlexOlmo's own merge)
ABLATIONS = {
    "no negative bias": ((*EXPERT_FLAGS, "--no-negative-bias"), 0.0),
    "random router init": (("--router-init", "random"), None),
}
UNCOORDINATED = "uncoordinated"
FULL = "flexolmo"


def slug(name: str) -> str:
  return name.replace("'", "").replace(" ", "_")


class Ablations:
  """The ablation stage: runs only when the demo was asked for it (``with_ablations``)."""

  def ablations(self) -> None:
    self.ablation_results = {}
    if not self.with_ablations:
      return
    print(f"[ablations] {len(ABLATIONS)} variants of the owners' training, each merged, tuned "
          "and evaluated; and the uncoordinated experts (the dense models, merged as BTX does)")
    runs = []
    for name, (flags, _) in ABLATIONS.items():
      runs += [(out, [*argv, *flags], f"{what} ({name})", inputs) for out, argv, what, inputs in
               self.per_domain("train-expert", os.path.join("ablations", slug(name), "experts"),
                               "expert", "expert")]
    self.train_all(runs)
    models = {FULL: (self.merged, self.tuned)}
    for name, (_, bias) in ABLATIONS.items():
      models[name] = self.ablation_models(name, self.size.expert_bias if bias is None else bias)
    models[UNCOORDINATED] = (self.path("baselines", "btx"), self.baseline_paths["btx"])
    # The full method's and BTX's tuned model were evaluated in stage 7 under these names.
    known = {(FULL, "untuned"): "flexolmo (no router tuning)", (FULL, "tuned"): "flexolmo",
             (UNCOORDINATED, "tuned"): "btx"}
    for name, paths in models.items():
      self.ablation_results[name] = {
          column: mean(self.loss_of(known.get((name, column), f"ablation {name} {column}"), path))
          for column, path in zip(("untuned", "tuned"), paths)}
      r = self.ablation_results[name]
      print(f"  {name:>20}: average {r['untuned']:.4f} untuned, {r['tuned']:.4f} tuned")

  def ablation_models(self, name: str, expert_bias: float) -> tuple[str, str]:
    """(merged, tuned) directories of one ablation's experts."""
    from flexolmo_jax.flexolmo import merge

    root = self.path("ablations", slug(name))
    merged = os.path.join(root, "merged")
    experts = [os.path.join(root, "experts", d) for d in self.closed]
    inputs = self.provenance.inputs(self.path("public"), *experts)
    if not self.reusable(merged, inputs):
      self.worked = True
      merge.merge(self.path("public"), experts, merged, top_k=1 + len(self.closed),
                  expert_bias=expert_bias)
      self.provenance.record(merged, inputs)
    return merged, self.tune(merged, os.path.join(root, "tuned"),
                             expert_dropout=self.size.tune_dropout)
