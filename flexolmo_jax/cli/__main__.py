"""``python -m flexolmo_jax.cli``: the ``flexolmo`` command."""
import sys

from flexolmo_jax.cli import main

sys.exit(main())
