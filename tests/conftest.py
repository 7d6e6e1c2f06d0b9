"""Test set-up: 8 fake CPU devices (set before JAX initializes), the CLI's XLA:CPU flags,
fp32-exact matmuls and one compilation cache for the session."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session, this process and every process the tests
# start (the demo's experts, the multi-host runs, the CLI tests compile the same programs).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit
  import shutil
  import tempfile

  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="flexolmo-test-jax-cache-")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
# A 2-core CI runner that stalls one of the 8 fake devices' threads must not abort the suite;
# the CPU code generator that compiles faster.
from flexolmo_jax.distributed import cpu_xla_flags  # noqa: E402

cpu_xla_flags()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
# Each program runs to the end before the next is dispatched. With asynchronous dispatch the 8
# fake devices' threads can sit in collectives of different programs (step N and N+1) and wait
# for each other for ever: observed as a training step stuck at 0% CPU (an XLA:CPU all-gather
# that "expected 8 threads, 7 arrived"). Real accelerators and the 1-device CLI are unaffected.
jax.config.update("jax_cpu_enable_async_dispatch", False)
jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


# The fixtures import their helpers when first used, so that pytest-xdist's controller process,
# which runs no test, does not import TensorFlow, seqio and torch for nothing.
@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
  from tests import artifacts

  return artifacts.make_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def world(tmp_path_factory):
  from tests import artifacts

  return artifacts.make_world(tmp_path_factory.mktemp("hostile"))
