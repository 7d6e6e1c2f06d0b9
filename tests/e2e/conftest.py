"""The end-to-end tests' session fixtures: the quick demo, run once, and what they take from it
(tests/e2e/fixtures.py)."""
import pytest

from tests.e2e.fixtures import (code_expert, demo_run, experts, flexmix,  # noqa: F401
                                 olmo2_tokenizer, public)


def pytest_collection_modifyitems(items):
  """Everything here is slow (``make test`` runs it, ``make test-fast`` does not). The tests that
  read the quick demo's artifacts are one group (``pytestmark = DEMO_READERS`` in their
  modules): one pytest-xdist worker runs them all (``--dist loadgroup``), so the demo
  runs once while the other worker takes the rest. A test that reads the demo outside the group
  is refused here, before the demo would run twice."""
  for item in items:
    if "/e2e/" in str(item.fspath):
      item.add_marker(pytest.mark.slow)
      groups = [m.args for m in item.iter_markers("xdist_group")]
      if "demo_run" in getattr(item, "fixturenames", ()) and groups != [("demo",)]:
        raise pytest.UsageError(f"{item.nodeid} reads the quick demo: mark its module with "
                                "pytestmark = DEMO_READERS (tests/e2e/fixtures.py).")
