"""The benchmark scripts that ``bench/gpu.sh`` runs on a lent GPU, at tiny shapes on this CPU, so
that a device's few minutes are not spent finding a broken flag."""
import importlib.util
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench_module(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "bench", name + ".py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_train_step_times_a_model_gin_by_name_without_transformers(capsys):
  """``--only olmo2_1b --no-hf`` (gpu.sh's fit check) takes any model gin; here ``tiny``."""
  bench_module("train_step").main(["--only", "tiny", "--no-hf", "--skip-expert", "--batch", "2",
                                   "--seq", "48", "--reps", "1"])
  out = capsys.readouterr().out
  assert "batch 2 x 48, fp32" in out
  row = re.search(r"^\s+tiny\s+([\d.]+)M\s+(\d+)\s+nan\s+nan\s+([\d.]+)%$", out, re.M)
  assert row and int(row[2]) > 0 and float(row[3]) > 0, out


def test_gpu_script_runs_only_flags_its_scripts_accept():
  """Every ``--flag`` gpu.sh passes to a bench script is one that script's parser declares."""
  script = open(os.path.join(ROOT, "bench", "gpu.sh")).read().replace("\\\n", " ")
  calls = re.findall(r"python3 bench/(\w+)\.py([^\n]*)", script)
  assert {name for name, _ in calls} >= {"attention", "train_step", "moe_dispatch"}
  for name, args in calls:
    declared = set(re.findall(r"add_argument\(\s*\"(--[\w-]+)\"",
                              open(os.path.join(ROOT, "bench", name + ".py")).read()))
    assert set(re.findall(r"(--[\w-]+)", args)) <= declared, (name, args, declared)
