"""``flexolmo plan``'s parsing: collectives from a module's text, target names. The compiled plans
are tested in tests/e2e/test_plan.py (each compiles three programs)."""
import pytest

from flexolmo_jax.plan import report, targets


def test_collectives_are_read_from_the_module_text():
  hlo = """
  %ag = f32[8,64]{1,0} all-gather(f32[2,64]{1,0} %p), dimensions={0}
  %ar-start = (bf16[4,4]{1,0}, f32[2]{0}) all-reduce-start(%a, %b), to_apply=%add
  %ar-done = (bf16[4,4]{1,0}, f32[2]{0}) all-reduce-done(%ar-start)
  %a2a = f8e4m3fn[16]{0} all-to-all(f8e4m3fn[16]{0} %q), dimensions={0}
  %x = f32[8]{0} add(f32[8]{0} %y, f32[8]{0} %z)
  """
  assert report.collectives(hlo) == {"all-gather": {"count": 1, "bytes": 8 * 64 * 4},
                                     "all-reduce": {"count": 1, "bytes": 4 * 4 * 2 + 2 * 4},
                                     "all-to-all": {"count": 1, "bytes": 16}}


def test_bad_targets_are_named():
  with pytest.raises(ValueError, match="v5e:4x4"):
    targets.resolve("v9z:2x2")
  with pytest.raises(ValueError, match="--num-slices"):
    targets.resolve("cpu", num_slices=2)
