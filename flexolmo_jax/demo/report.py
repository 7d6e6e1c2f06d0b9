"""The demo's report: ``report.json`` (every number), ``report.md`` (the tables) and
``report.png`` (the bars)."""
from __future__ import annotations

import dataclasses
import json
import os
import platform


class Report:
  """Stage 10: the report of every stage's results."""

  def report(self) -> dict:
    domains = self.evaluable
    table = {name: {**{d: losses[d] for d in domains}, "average": mean(losses)}
             for name, losses in self.losses.items()}
    report = {
        "size": self.size_name, "config": dataclasses.asdict(self.size), "seed": self.seed,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "corpus_sha256": self.card["sha256"],
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
    if self.ablation_results:
      report["ablations"] = self.ablation_results
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


def mean(losses: dict) -> float:
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
          "opted out.\n\n" + head + rows + render_ablations(report.get("ablations")) + routing
          + extraction + render_dp(report.get("dp")) +
          f"\nHugging Face export: {json.dumps(hf)}\n")


def render_ablations(ablations: dict | None) -> str:
  """The ablation table: each variant's average validation loss, untuned and tuned."""
  if not ablations:
    return ""
  return ("\nAblations (demo/ablations.py): each changes one thing of `flexolmo` and goes through "
          "the same merge, router tuning and evaluation. Average validation loss:\n\n"
          "| variant | no router tuning | router tuned |\n|---|---|---|\n"
          + "".join(f"| {name} | {r['untuned']:.3f} | {r['tuned']:.3f} |\n"
                    for name, r in ablations.items()))


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
