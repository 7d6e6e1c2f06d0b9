"""The end-to-end tests' session fixtures: the quick demo, run once, and what they take from it
(tests/e2e/fixtures.py)."""
import pytest

from tests.e2e.fixtures import code_expert, demo_run, experts, flexmix, public  # noqa: F401


@pytest.hookimpl(tryfirst=True)        # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items):
  """Everything here is slow (``make test`` runs it, ``make test-fast`` does not). The tests that
  read the quick demo's artifacts form one group, run by one pytest-xdist worker (``--dist
  loadgroup``), so the demo runs once; the other worker takes the rest meanwhile."""
  for item in items:
    if "/e2e/" in str(item.fspath):
      item.add_marker(pytest.mark.slow)
      if "demo_run" in getattr(item, "fixturenames", ()):
        item.add_marker(pytest.mark.xdist_group("demo"))
