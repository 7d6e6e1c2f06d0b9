"""Test set-up: 8 fake CPU devices (set before JAX initializes) and fp32-exact matmuls."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# 8 fake devices share 2 cores: a collective waits for all 8 device threads, and on a loaded
# machine the last one can arrive after XLA:CPU's default 40 s rendezvous limit, which aborts the
# process. Allow 20 minutes (a real deadlock still ends, by pytest's timeout).
_RENDEZVOUS = ("--xla_cpu_collective_call_terminate_timeout_seconds=1200 "
               "--xla_cpu_collective_timeout_seconds=1200")
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_RENDEZVOUS}".strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")

from tests.fixtures import code_expert, experts, flexmix, public  # noqa: E402,F401  (session)
