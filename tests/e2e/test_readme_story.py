"""The README's story runs exactly as written there (only ``--steps`` and ``--max-new-tokens``
made smaller), from a fresh directory with relative paths (tests/test_readme.py checks that
every command in it parses)."""
import ast
import json
import os
import re
import subprocess
import sys

import pytest

from flexolmo_jax import console
from tests.e2e.test_plan_tpu import check_v5e_plan
from tests.test_readme import README, SIZES, story


def shrink(script: str) -> str:
  for flag, value in SIZES.items():
    script = re.sub(rf"(?<=\s){re.escape(flag)} \d+", f"{flag} {value}", script)
  return script


@pytest.mark.slow
def test_the_readme_story_runs_as_written(tmp_path):
  """Runs the story with bash, from an empty directory, as a user pastes it into a shell."""
  script = shrink(story(open(README).read()))
  bin_dir = os.path.dirname(sys.executable)          # where `flexolmo` is installed
  env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
         "JAX_PLATFORMS": "cpu"}
  env.pop(console.VERBOSE_ENV, None)
  run = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=1500)
  assert run.returncode == 0, (run.stdout + run.stderr)[-5000:]
  for path in ("data/tfds/code/1.0.0", "runs/public/model/manifest.json",
               "runs/code/expert/manifest.json", "runs/math/expert/manifest.json",
               "runs/merged/manifest.json", "runs/tuned/merged/manifest.json",
               "hf/flexolmo/config.json", "runs/imported/merged/manifest.json",
               "runs/imported/experts/math/manifest.json"):
    assert os.path.exists(tmp_path / path), path
  out = run.stdout
  assert re.search(r"^\s+code\s+\d+\.\d+", out, re.M) and "--- prompt 'def main('" in out
  assert "srun" in out and "flexolmo train-expert --public runs/public" in out
  assert re.search(r"^train-expert on v5e:2x2: 4 devices.*\n.*\ntotal .* fits$", out, re.M), out
  check_v5e_plan(json.loads((tmp_path / "plan.json").read_text()), run.stderr, "tiny",
                 "train-expert")
  # A quiet console: the libraries' start-up noise is gone, our own lines are there.
  assert console.NATIVE_NOISE.search(run.stderr) is None, run.stderr[-3000:]
  assert "[train 3/3]" in run.stderr + out
  # The server answered curl with the math owner opted out, and the openai client's stream.
  answer = json.JSONDecoder().raw_decode(out[out.index('{"id":"cmpl-'):])[0]
  assert answer["attribution"]["math"] == 0 and abs(sum(answer["attribution"].values()) - 1) < 1e-6
  shares = ast.literal_eval(out.split("attribution: ", 1)[1].splitlines()[0])
  assert shares["math"] == shares.get("legal", 0) == 0 and shares["code"] > 0
