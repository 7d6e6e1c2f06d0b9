"""Router tuning on public proxy data: it helps, and it never opens closed data."""
import os
import pytest
from flexolmo_jax.checkpoint import merged_model, store
from flexolmo_jax.data import flexmix_mini
from flexolmo_jax.eval import perplexity
from flexolmo_jax.flexolmo import merge
from tests.e2e.fixtures import DEMO_READERS, validation
from tests.helpers import run_cli

pytestmark = DEMO_READERS


@pytest.mark.slow
def test_router_tuning_lowers_the_average_loss_and_reads_no_closed_data(public, experts, flexmix,
                                                                        tmp_path):
  n = 1 + len(experts)
  untuned = merge.merge(public["run"], list(experts.values()), str(tmp_path / "untuned"), top_k=n)
  data = validation(flexmix)
  # Every closed domain's data (prepared dataset and raw JSONL) is moved out of reach: any read
  # of it during tuning fails. (Renaming, not chmod: the tests may run as root.)
  root = os.path.dirname(os.path.dirname(os.path.dirname(flexmix["public"])))
  hidden = []
  for d in flexmix_mini.CLOSED_DOMAINS:
    for path in (os.path.dirname(flexmix[d]), os.path.join(root, "raw", f"{d}.jsonl")):
      os.rename(path, path + ".hidden")
      hidden.append(path)
  try:
    run = run_cli(["tune-router", "--merged", untuned, "--data", flexmix["public"],
                   "--out", str(tmp_path / "tune"), "--steps", "100", "--warmup", "10",
                   "--batch-size", "8", "--seq-len", "128", "--log-every", "50"])
  finally:
    for path in hidden:
      os.rename(path + ".hidden", path)
  assert run.returncode == 0, run.stderr[-3000:]
  tuned = os.path.join(tmp_path, "tune", "merged")
  manifest = store.read_manifest(tuned, "merged")
  assert manifest["router"]["source"] == "tune-router"
  assert manifest["router"]["public_sources"] == ["flexmix_public/1.0.0"]
  assert all(c > 0 for c in manifest["router"]["proxy_segments"].values())
  before = perplexity.evaluate(untuned, data)
  after = perplexity.evaluate(tuned, data)
  mean = lambda losses: sum(losses.values()) / len(losses)
  print("validation loss, untuned -> tuned: "
        + ", ".join(f"{d} {before[d]:.4f} -> {after[d]:.4f}" for d in before)
        + f"; average {mean(before):.4f} -> {mean(after):.4f}")
  assert mean(after) < mean(before)
  # Only the router changed: the experts' files are the untuned merge's, byte for byte.
  untuned_files = store.read_manifest(untuned)["files"]
  assert {k: v for k, v in manifest["files"].items() if k != merged_model.ROUTER_FILE} == \
         {k: v for k, v in untuned_files.items() if k != merged_model.ROUTER_FILE}
