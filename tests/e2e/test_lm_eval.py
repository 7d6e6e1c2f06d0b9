"""lm-evaluation-harness with our model class against the harness's own Hugging Face model on our
exported checkpoint: a local multiple-choice task and a local generation task, from local JSONL;
and opting an owner out on benchmarks of the quick demo's model."""
import json
import os

import numpy as np
import pytest

from flexolmo_jax import cli
from flexolmo_jax.convert import export, importer
from tests.e2e.fixtures import DEMO_READERS
from tests.e2e.test_released_tokenizer import release

MC_YAML = """task: local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""
GEN_YAML = """task: local_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
"""
WORDS = "def class return import lambda yield while for print open list dict".split()


def local_tasks(directory):
  os.makedirs(directory)
  rng = np.random.RandomState(0)
  mc, gen = [], []
  for i in range(12):
    words = list(rng.choice(WORDS, 6))
    mc.append({"context": " ".join(words[:3]), "choices": [" " + w for w in words[3:]],
               "answer": int(rng.randint(3))})
    gen.append({"prompt": f"{words[0]}({i}) -> {words[1]}", "target": words[2]})
  for name, rows, yaml in (("mc", mc, MC_YAML), ("gen", gen, GEN_YAML)):
    data = os.path.join(directory, f"{name}.jsonl")
    with open(data, "w") as fh:
      fh.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(directory, f"{name}.yaml"), "w") as fh:
      fh.write(yaml.format(data=data))
  return str(directory)


@pytest.mark.slow
def test_our_model_class_scores_like_the_harness_hf_model(tmp_path, monkeypatch, capsys):
  from lm_eval import evaluator
  from lm_eval.tasks import TaskManager

  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  hf_dir, _ = release("flex_olmo", tmp_path / "flex")
  merged = importer.import_hf(hf_dir, str(tmp_path / "ours"), progress=lambda _: None)
  tasks_dir = local_tasks(tmp_path / "tasks")

  def run(model, **kw):
    return evaluator.simple_evaluate(model=model, tasks=["local_mc", "local_gen"],
                                     task_manager=TaskManager(include_path=tasks_dir),
                                     log_samples=True, **kw)

  # Ours through `flexolmo lm-eval`, as the harness writes its results.
  out = tmp_path / "results.json"
  assert cli.main(["lm-eval", "--model", merged, "--tasks", "local_mc,local_gen",
                   "--include-path", tasks_dir, "--batch-size", "4", "--log-samples",
                   "--json", str(out)]) == 0
  assert "local_mc" in capsys.readouterr().out          # the harness's table
  ours = json.loads(out.read_text())
  exported = export.export_hf(merged, str(tmp_path / "exported"), progress=lambda _: None)
  theirs = run("hf", model_args=f"pretrained={exported},dtype=float32", device="cpu",
               batch_size=4)
  assert ours["results"]["local_mc"]["acc,none"] == theirs["results"]["local_mc"]["acc,none"]
  for a, b in zip(ours["samples"]["local_mc"], theirs["samples"]["local_mc"]):
    np.testing.assert_allclose([r[0] for r in a["filtered_resps"]],
                               [r[0] for r in b["filtered_resps"]], atol=1e-3)
  mine = [s["resps"] for s in ours["samples"]["local_gen"]]
  assert mine == [s["resps"] for s in theirs["samples"]["local_gen"]]
  assert any(r[0][0] for r in mine)                 # something was generated


ROLLING_YAML = """task: demo_{domain}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
"""
DOMAINS = ("code", "prose", "legal", "math")


@pytest.mark.slow
@DEMO_READERS[0]
@DEMO_READERS[1]
def test_opting_an_owner_out_costs_its_own_domain_most(demo_run, tmp_path, monkeypatch):
  """The quick demo's tuned merged model as a harness model, opted in and with math out, on
  a bits-per-byte task per owner (ten of the owner's documents): opting math out costs math
  more than twice what it costs any other owner's domain."""
  from lm_eval import evaluator
  from lm_eval.tasks import TaskManager

  from flexolmo_jax.eval.harness import FlexOlmoLM

  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  raw = os.path.join(demo_run["workdir"], "flexmix_mini", "raw")
  for domain in DOMAINS:
    with open(os.path.join(raw, f"{domain}.jsonl")) as fh:
      docs = [t for t in (json.loads(line)["text"] for line in fh) if len(t) >= 100][:10]
    data = tmp_path / f"{domain}.jsonl"
    data.write_text("".join(json.dumps({"text": t[:600]}) + "\n" for t in docs))
    (tmp_path / f"{domain}.yaml").write_text(ROLLING_YAML.format(domain=domain, data=data))
  tuned = os.path.join(demo_run["workdir"], "tuned", "merged")

  def bits_per_byte(**select):
    results = evaluator.simple_evaluate(
        model=FlexOlmoLM(tuned, batch_size=8, max_length=128, **select),   # trained at 128
        tasks=[f"demo_{d}" for d in DOMAINS],
        task_manager=TaskManager(include_path=str(tmp_path)))["results"]
    return {d: results[f"demo_{d}"]["bits_per_byte,none"] for d in DOMAINS}

  full, without_math = bits_per_byte(), bits_per_byte(exclude="math")
  cost = {d: without_math[d] - full[d] for d in DOMAINS}
  print("bits per byte", full, "cost of opting math out", cost)
  assert cost["math"] > 2 * max(abs(cost[d]) for d in DOMAINS if d != "math"), cost
