"""Test set-up: 8 fake CPU devices (set before JAX initializes), XLA:CPU flags (the CLI's and
faster compiles), fp32-exact matmuls and one compilation cache for the session."""
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
# Every program, also those compiling in under JAX's default second (most, at the tests' sizes
# and flags): the processes the tests start run the same tiny programs again and again.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# The allocator and collector settings of a command's own process (flexolmo_jax/cli/process.py)
# for the tests' processes too, which run the same steps in-process: the unit tests take 2:30
# CPU minutes instead of 2:53 with the collector's default thresholds.
from flexolmo_jax.cli import process  # noqa: E402

process.tune()
# A 2-core CI runner that stalls one of the 8 fake devices' threads must not abort the suite.
from flexolmo_jax.distributed import patient_cpu_collectives  # noqa: E402

patient_cpu_collectives()
# Without XLA:CPU's fusion emitters, the small programs of the tests (and of the processes they
# start, which inherit XLA_FLAGS) compile 1.7x faster and run no slower: the tiny model's
# forward and backward compiles in 2.8 s instead of 4.7 s and runs in 4.9 ms instead of 6.9 ms.
# Not for users' runs: at the default demo size a training step is 5-9% slower without them.
if "xla_cpu_use_fusion_emitters" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_cpu_use_fusion_emitters=false"

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
# Each program runs to the end before the next is dispatched. With asynchronous dispatch the 8
# fake devices' threads can sit in collectives of different programs (step N and N+1) and wait
# for each other for ever: observed as a training step stuck at 0% CPU (an XLA:CPU all-gather
# that "expected 8 threads, 7 arrived"). Real accelerators and the 1-device CLI are unaffected.
jax.config.update("jax_cpu_enable_async_dispatch", False)
jax.config.update("jax_default_matmul_precision", "highest")

# A pytest-xdist worker's TensorFlow starts as quietly as a command's: the C++ logging settings
# of console.QUIET_ENV, read once when it loads, are set only while it loads. The processes the
# tests start inherit none of them, so each test still sees what a user's command prints. (The
# controller process runs no test and loads no TensorFlow.)
if "PYTEST_XDIST_WORKER" in os.environ:
  from flexolmo_jax import console  # noqa: E402

  _loading = {k: console.QUIET_ENV[k] for k in ("TF_CPP_MIN_LOG_LEVEL", "GLOG_minloglevel",
                                                "GRPC_VERBOSITY") if k not in os.environ}
  os.environ.update(_loading)
  import tensorflow  # noqa: E402,F401

  for _key in _loading:
    del os.environ[_key]

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


def pytest_sessionfinish(session):
  """pytest-xdist stops a worker by interrupting its main thread (execnet). Landing inside JAX's
  garbage-collection hook, that KeyboardInterrupt was printed as an unraisable exception after
  every run; the hook has nothing left to free once the session is over."""
  import gc

  gc.callbacks[:] = [c for c in gc.callbacks if getattr(c, "__module__", "") != "jax._src.lib"]
