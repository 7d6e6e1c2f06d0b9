"""A quiet console: the libraries' start-up noise is gone by default and back with --verbose;
our own lines and anything unknown on stderr always get through."""
import json
import pytest
from flexolmo_jax import console
from tests.helpers import run_cli
NOISE = ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
         "I0000 00:00:1.2 3 cudart_stub.cc:31] Could not find cuda drivers on your machine.\n"
         "E0000 00:00:1.2 3 cuda_executor.cc:1] failed call to cuInit: INTERNAL: (303)\n"
         "I0000 00:00:1.2 3 port.cc:153] oneDNN custom operations are on.\n")


@pytest.mark.slow
def test_start_up_noise_is_gone_by_default_and_back_with_verbose(tmp_path):
  """`data prepare` loads TensorFlow and TFDS, as every data-reading command does."""
  data = tmp_path / "docs.jsonl"
  data.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(40)))
  env = {console.VERBOSE_ENV: ""}
  quiet = run_cli(["data", "prepare", "--name", "docs", "--path", str(data), "--data-dir",
                   str(tmp_path / "q")], timeout=300, env=env)
  assert quiet.returncode == 0, quiet.stderr
  assert console.NATIVE_NOISE.search(quiet.stderr) is None, quiet.stderr
  assert "Downloading and preparing" not in quiet.stdout and "Generating" not in quiet.stderr
  assert "docs: " in quiet.stdout and "validation documents" in quiet.stdout    # our own line
  loud = run_cli(["data", "prepare", "--verbose", "--name", "docs", "--path", str(data),
                  "--data-dir", str(tmp_path / "v")], timeout=300, env=env)
  assert loud.returncode == 0, loud.stderr
  assert console.NATIVE_NOISE.search(loud.stderr), loud.stderr
  assert "Downloading and preparing" in loud.stdout
