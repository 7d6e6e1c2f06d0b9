"""Test set-up: 8 fake CPU devices (set before JAX initializes) and fp32-exact matmuls."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")

from tests.fixtures import code_expert, experts, flexmix, public  # noqa: E402,F401  (session)
