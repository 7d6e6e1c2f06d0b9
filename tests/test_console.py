"""A quiet console: the libraries' start-up noise is gone by default and back with --verbose;
our own lines and anything unknown on stderr always get through."""
import os
import subprocess
import sys


from flexolmo_jax import console

NOISE = ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
         # libtpu on a host without a TPU: a fragment with no newline, then a warning in parts.
         "Failed to find host bounds for accelerator type: "
         "WARNING: could not determine TPU accelerator type, please set env var "
         "`TPU_ACCELERATOR_TYPE` manually\n"
         "I0000 00:00:1.2 3 cudart_stub.cc:31] Could not find cuda drivers on your machine.\n"
         "E0000 00:00:1.2 3 cuda_executor.cc:1] failed call to cuInit: INTERNAL: (303)\n"
         "I0000 00:00:1.2 3 port.cc:153] oneDNN custom operations are on.\n")


def test_native_noise_is_filtered_and_everything_else_kept():
  """The stderr filter of a command-line process: noise lines out, every other byte through, in
  order, nothing lost at exit (even a partial last line)."""
  program = ("import os, sys\nfrom flexolmo_jax import console\nconsole.filter_native_stderr()\n"
             f"os.write(2, {NOISE.encode()!r})\n"
             "os.write(2, b'Failed to find host bounds for accelerator type: ')\n"
             "os.write(2, b'a real error from native code\\n\\r[##..] progress')\n"
             "print('and a Python traceback line', file=sys.stderr)\n")
  run = subprocess.run([sys.executable, "-c", program], capture_output=True, timeout=60)
  assert run.returncode == 0
  assert run.stderr == (b"a real error from native code\n\r[##..] progressand a Python "
                        b"traceback line\n")


def test_switches_are_taken_from_anywhere_and_inherited(monkeypatch):
  # Recorded by monkeypatch, so the variables that take_switches sets are removed afterwards.
  monkeypatch.setenv(console.VERBOSE_ENV, "")
  monkeypatch.setenv(console.NO_VERIFY_ENV, "")
  assert console.take_switches(["eval", "--model", "m"]) == ["eval", "--model", "m"]
  assert not console.verbose()
  assert console.take_switches(["eval", "--verbose", "--model", "m", "--no-verify"]) == \
      ["eval", "--model", "m"]
  assert console.verbose() and os.environ[console.VERBOSE_ENV] == "1"
  assert os.environ[console.NO_VERIFY_ENV] == "1"
