"""The demo's stages 7-9: validation losses of every model, routing, the canaries' extraction
and the Hugging Face export checked against transformers."""
from __future__ import annotations

import dataclasses
import json
import os

from flexolmo_jax.checkpoint import merged_model, saved
from flexolmo_jax.data import tasks
from flexolmo_jax.demo.processes import write_json
from flexolmo_jax.demo.report import mean
from flexolmo_jax.experts import PUBLIC


class Evaluation:
  """Stages 7-9 over the models the training stages left in the work directory."""

  def evaluate(self) -> None:
    print("[7/10] validation loss of every model on every domain")
    vocab = self.vocab = saved.vocabulary(self.path("public"))
    data = {d: list(tasks.eval_batches({d: [self.raw[d]]}, vocab, self.path("eval", "data"),
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
    self.eval_data = data
    self.losses = {name: self.loss_of(name, path, **select)
                   for name, (path, select) in models.items()}
    self.routing = self.route(data)

  def loss_of(self, name: str, path: str, **select) -> dict:
    """{domain: validation loss} of one model (``select``: its experts in or out), kept in
    ``eval/<name>.json`` and reused from there while the model and the data are the same."""
    from flexolmo_jax.eval import perplexity

    os.makedirs(self.path("eval"), exist_ok=True)
    cache = self.path("eval", name.replace(" ", "_").replace(",", "").replace("'", "") + ".json")
    inputs = self.provenance.inputs(path, self.card_file(), **select)
    if self.reusable(cache, inputs):
      with open(cache) as fh:
        return json.load(fh)
    self.worked = True
    stats = perplexity.evaluate_stats(path, self.eval_data, vocab=self.vocab, **select)
    losses = {d: s["loss"] for d, s in stats.items()}
    write_json(cache, losses)
    self.provenance.record(cache, inputs)
    print(f"  {name:>28}: average {mean(losses):.4f}")
    return losses

  def route(self, data: dict) -> dict:
    """{model: {domain: {expert: mean router probability}}} of both FlexOlmo models."""
    from flexolmo_jax.eval import routing

    cache = self.path("eval", "routing.json")
    inputs = self.provenance.inputs(self.merged, self.tuned, self.card_file())
    if self.reusable(cache, inputs):
      with open(cache) as fh:
        return json.load(fh)
    self.worked = True
    out = {}
    for name, path in (("flexolmo (no router tuning)", self.merged), ("flexolmo", self.tuned)):
      cfg, params = merged_model.load_merged(path)
      out[name] = {d: routing.router_probabilities(cfg, params, batches)
                   for d, batches in data.items()}
    write_json(cache, out)
    self.provenance.record(cache, inputs)
    return out

  def extraction(self) -> None:
    """The canaries' extraction rate by FlexOlmo with their owner's expert in and out, beside
    the public model, that owner's dense model, and its expert alone with the public one."""
    from flexolmo_jax.eval import extraction

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
    models = {"public": (self.path("public"), {}),
              f"dense {owner}": (os.path.join(self.path("dense", owner), "model"), {}),
              f"public + {owner}": (self.merged, {"experts": f"{PUBLIC},{owner}"}),
              "flexolmo": (self.tuned, {}),
              f"flexolmo without {owner}": (self.tuned, {"exclude": owner}),
              f"public + {owner} (DP)": (self.merged_dp, {})}
    inputs = self.provenance.inputs(*{path for path, _ in models.values()}, self.card_file())
    if self.reusable(cache, inputs):
      with open(cache) as fh:
        self.extraction_results = json.load(fh)
      print(f"  reusing {cache}")
      return
    self.worked = True
    vocab = self.vocab
    with open(info["path"]) as fh:
      docs = [vocab.encode(json.loads(line)["text"]) for line in fh]
    results = {"owner": owner, "config": dataclasses.asdict(config), "models": {}}
    for name, (path, select) in models.items():
      cfg, params, _ = saved.open_saved(path, **select)
      r = extraction.extraction(cfg, params, docs, config, eos_id=vocab.eos_id)
      r.pop("per_document")
      r["canary_loss"] = extraction.document_loss(cfg, params, docs, config.total)
      results["models"][name] = r
      print(f"  {name:>28}: {r['extracted']}/{r['documents']} extracted, mean best similarity "
            f"{r['mean_best_similarity']:.3f}, canary loss {r['canary_loss']:.3f}")
    write_json(cache, results)
    self.provenance.record(cache, inputs)
    self.extraction_results = results

  def export(self) -> None:
    import numpy as np

    from flexolmo_jax.convert import export
    from flexolmo_jax.model.transformer import pure_model

    print("[9/10] Hugging Face export of FlexOlmo, checked against transformers")
    out = self.path("hf")
    inputs = self.provenance.inputs(self.tuned)
    if not self.reusable(os.path.join(out, "config.json"), inputs, directory=out):
      export.export_hf(self.tuned, out, drop_negative_bias=True, overwrite=True)
      self.provenance.record(os.path.join(out, "config.json"), inputs)
    try:
      import torch
      from transformers import AutoModelForCausalLM
    except ImportError:
      self.hf_check = {"skipped": "transformers/torch not installed (pip install '.[hf]')"}
      print(f"  {self.hf_check['skipped']}")
      return
    ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    cfg, params = merged_model.load_merged(self.tuned)
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
