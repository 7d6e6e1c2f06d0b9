"""``flexolmo plan`` for a TPU topology, compiled on this CPU host through libtpu (the test
extra installs it): the CLI's JSON, the compiler's step estimate and the collectives."""
import json

import pytest

from tests.helpers import run_cli

pytestmark = pytest.mark.slow


def plan(tmp_path, *flags):
  out = tmp_path / "plan.json"
  run = run_cli(["plan", *flags, "--json", str(out)], timeout=600)
  assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
  return json.loads(out.read_text()), run


def check_v5e_plan(got: dict, stderr: str, model: str, task: str) -> None:
  """The plan of ``model``'s ``task`` on v5e:2x2 at 8 x 128 tokens: its JSON (``got``) and the
  command's stderr. The README's story plans tiny's expert training exactly so
  (tests/e2e/test_readme_story.py checks its plan.json with this)."""
  from flexolmo_jax.config import load_model_config
  from flexolmo_jax.train import metrics

  for key in ("topology", "devices", "mesh", "per_device_bytes", "hbm_bytes", "fits", "flops",
              "estimated_step_seconds", "estimated_mfu", "collectives"):
    assert key in got, key
  assert got["devices"] == 4 and got["mesh"]["fsdp"] == 4 and got["hbm_bytes"] == 16 * 1024**3
  assert set(got["per_device_bytes"]) == {"params", "optimizer", "frozen", "batch", "cache",
                                          "temporaries", "total"}
  assert got["fits"] and got["estimated_step_seconds"] > 0 and 0 < got["estimated_mfu"] <= 1
  assert got["step_seconds_from"] in ("compiler", "roofline")
  # FSDP: parameters are gathered where they are used.
  assert got["collectives"]["all-gather"]["count"] > 0
  # Splash attention runs on the TPU: its FLOPs, which the compiler does not count, are a line.
  cfg = load_model_config(model)
  passes = 1 / 3 if task == "eval" else 1       # the forward pass of the 6N convention's three
  assert got["kernel_flops"] == pytest.approx(
      metrics.attention_flops_per_token(cfg, 128) * 8 * 128 * passes, rel=1e-12)
  assert got["flops"] == got["compiled_flops"] + got["kernel_flops"]
  if task == "eval":
    assert got["global_bytes"]["params"] == cfg.num_params() * 4
    assert got["global_bytes"]["optimizer"] == 0
    assert abs(got["flops"] / (metrics.flops_per_token(cfg, 128) * 8 * 128 / 3) - 1) < 0.1
  # libtpu's complaints about a host without a TPU do not reach the console.
  assert "TPU_WORKER_HOSTNAMES" not in stderr and "Source Location" not in stderr


# `small` is planned for evaluation, which compiles in a third of its training step's time.
# Training is planned for TPU with tiny by the README's story (check_v5e_plan), and on CPU in
# tests/e2e/test_plan.py.
def test_plan_of_small_on_a_v5e_slice(tmp_path):
  got, run = plan(tmp_path, "--model", "small", "--task", "eval", "--topology", "v5e:2x2",
                  "--batch-size", "8", "--seq-len", "128")
  check_v5e_plan(got, run.stderr, "small", "eval")


def test_plan_of_a_moe_runs_both_pallas_kernels_per_device(tmp_path):
  """Widths that the 128-wide tiles divide: auto picks megablox and splash on the TPU, both run
  under shard_map, and both kernels' FLOPs are a line of their own."""
  from flexolmo_jax.config import load_model_config
  from flexolmo_jax.train import metrics

  gin = ["flexolmo.ModelConfig.d_model=128", "flexolmo.ModelConfig.d_ff=256",
         "flexolmo.ModelConfig.experts=('public','a','b','c')", "flexolmo.ModelConfig.top_k=2"]
  got, _ = plan(tmp_path, "--model", "tiny", *[f for g in gin for f in ("--gin", g)],
                "--task", "tune-router", "--topology", "v5e:2x2", "--batch-size", "8",
                "--seq-len", "128")
  cfg = load_model_config("tiny", gin).replace(top_k=4)   # router tuning runs every expert
  ffn = 6.0 * 3 * cfg.d_model * cfg.d_ff * cfg.top_k * cfg.n_layers
  assert got["fits"] and got["kernel_flops"] == pytest.approx(
      (metrics.attention_flops_per_token(cfg, 128) + ffn) * 8 * 128)
