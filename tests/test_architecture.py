"""The package's shape, checked with ``ast``: layers import only downward, nothing imports in a
cycle, no function is over 60 lines and no module over 400 (docs/architecture.md)."""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "flexolmo_jax"
# The layers, lowest first: a module may import from its own layer's module or package and from
# layers below it, never from a layer above.
LAYERS = ("paths", "console", "experts", "config", "memory", "distributed", "sharding", "model",
          "data", "checkpoint", "train", "privacy", "flexolmo", "baselines", "convert", "eval",
          "serve", "plan", "launch", "demo", "cli")
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 400


def modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


def imports(name: str, path: pathlib.Path, known) -> set[str]:
  """The package's modules ``name`` imports (anywhere in the file, functions included)."""
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                        + ([base] if base else []))
      targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    else:
      continue
    found.update(t for t in targets if t.startswith("flexolmo_jax.") and t in known)
  return found - {name}


def layer(name: str) -> int:
  unit = name.split(".")[1]
  assert unit in LAYERS, f"{name} belongs to no declared layer; add {unit!r} to LAYERS"
  return LAYERS.index(unit)


@pytest.fixture(scope="module")
def graph():
  known = modules()
  return {name: imports(name, path, known) for name, path in known.items() if name != "flexolmo_jax"}


def test_every_import_goes_down_the_layers(graph):
  upward = [f"{a} -> {b}" for a, targets in graph.items() for b in sorted(targets)
            if layer(b) > layer(a)]
  assert not upward, "imports that climb the layers:\n" + "\n".join(upward)


def test_no_import_cycle(graph):
  state: dict[str, int] = {}
  cycles = []

  def visit(node, trail):
    state[node] = 1
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        cycles.append(" -> ".join(trail[trail.index(nxt):] + [nxt]))
      elif nxt not in state:
        visit(nxt, trail + [nxt])
    state[node] = 2

  for node in sorted(graph):
    if node not in state:
      visit(node, [node])
  assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_functions_and_modules_stay_small():
  long = []
  for name, path in modules().items():
    text = path.read_text()
    if len(text.splitlines()) > MAX_MODULE_LINES:
      long.append(f"module {name}: {len(text.splitlines())} lines")
    for node in ast.walk(ast.parse(text)):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        lines = node.end_lineno - node.lineno + 1
        if lines > MAX_FUNCTION_LINES:
          long.append(f"{name}.{node.name} (line {node.lineno}): {lines} lines")
  assert not long, "too long:\n" + "\n".join(long)


def test_the_checker_sees_an_upward_import_and_a_cycle():
  """The checks above can fail: a made-up graph with both defects is caught."""
  fake = {"flexolmo_jax.model.a": {"flexolmo_jax.cli"}, "flexolmo_jax.cli": {"flexolmo_jax.model.a"}}
  assert [a for a, ts in fake.items() for b in ts if layer(b) > layer(a)] == ["flexolmo_jax.model.a"]


def test_the_command_line_starts_without_tensorflow():
  """Building the parser (every `flexolmo` command does, `info` and `--help` do nothing more)
  imports neither TensorFlow, seqio nor JAX's programs: a command pays for them when it uses
  them."""
  import subprocess
  import sys

  probe = ("import sys; from flexolmo_jax import cli; cli.build_parser(); "
           "print(sorted(m for m in ('tensorflow', 'seqio', 'flexolmo_jax.flexolmo.expert', "
           "'flexolmo_jax.plan.programs') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "[]", out.stdout
