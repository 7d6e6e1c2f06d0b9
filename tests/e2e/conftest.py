"""The end-to-end tests' session fixtures: the quick demo, run once, and what they take from it
(tests/e2e/fixtures.py)."""
from tests.e2e.fixtures import code_expert, demo_run, experts, flexmix, public  # noqa: F401


def pytest_collection_modifyitems(items):
  """Everything here is slow (``make test`` runs it, ``make test-fast`` does not)."""
  import pytest

  for item in items:
    if "/e2e/" in str(item.fspath):
      item.add_marker(pytest.mark.slow)
