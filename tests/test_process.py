"""A command's own process (flexolmo_jax/cli/process.py): its allocator and collector settings,
checked in fresh interpreters so that this test process keeps its own."""
import subprocess
import sys
import textwrap

from flexolmo_jax.cli import process


def python(code: str) -> str:
  run = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                       text=True, timeout=120)
  assert run.returncode == 0, run.stderr[-3000:]
  return run.stdout


def test_a_command_process_collects_rarely_and_freezes_what_is_alive_at_its_end():
  out = python("""
      import gc
      from flexolmo_jax.cli import process
      with process.own():
        print(gc.get_threshold(), gc.get_freeze_count() == 0)
      print(gc.get_freeze_count() > 0)
      """)
  assert out.split("\n")[:2] == [f"{process.GC_THRESHOLDS} True", "True"]


def faults_of_reused_buffers(tuned: bool) -> int:
  """Minor page faults while a worker thread (as XLA's are) allocates and frees the same 40 MB
  buffer 50 times."""
  return int(python(f"""
      import resource, threading
      import numpy as np
      from flexolmo_jax.cli import process
      assert process.tune_allocator() if {tuned} else True
      def work():
        for _ in range(3):
          np.ones(5 << 20)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(50):
          np.ones(5 << 20)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
      thread = threading.Thread(target=work)
      thread.start()
      thread.join()
      """))


def test_the_tuned_allocator_reuses_freed_buffers_instead_of_faulting_them_in_again():
  assert faults_of_reused_buffers(tuned=False) > 500
  assert faults_of_reused_buffers(tuned=True) < 50
