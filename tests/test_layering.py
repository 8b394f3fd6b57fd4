"""The import rule of docs/architecture.md, checked by reading every module's imports with `ast`.

Nothing is imported or run: each .py file of moss_jax, data_pipelines and configs is parsed and
every `import` / `from ... import` in it (function-local ones included) becomes an edge of the
module graph. The tests fail, naming file:line, on
  * an import against the layer order (a layer may import only the layers it is allowed to);
  * an import cycle between modules;
  * a bottom-layer module importing JAX (or Flax, Optax, Orbax);
  * an import inside a function or class without a comment saying why.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("moss_jax", "data_pipelines", "configs")

# Layers, bottom first; see docs/architecture.md. A module belongs to the first layer one of
# whose prefixes it equals or lies under. moss_jax modules not named here are programs (top).
LAYERS: dict[str, tuple[str, ...]] = {
    "base": ("moss_jax.__init__", "moss_jax.errors", "moss_jax.progress", "moss_jax.cli",
             "moss_jax.batch", "moss_jax.mel_frontend", "moss_jax.model_config",
             "moss_jax.paths"),
    "data": ("data_pipelines",),
    "recipes": ("configs",),
    "runtime": ("moss_jax.sharding", "moss_jax.optim", "moss_jax.flops", "moss_jax.metrics",
                "moss_jax.distributed", "moss_jax.checkpoint", "moss_jax.host_memory"),
    "model": ("moss_jax.model", "moss_jax.decoding"),  # decoding: the model's KV-cache loop
    "hf": ("moss_jax.hf",),
    "programs": ("moss_jax",),
}
# What each layer may import besides itself.
ALLOWED: dict[str, set[str]] = {
    "base": set(),
    "data": {"base"},
    "recipes": {"base"},
    "runtime": {"base"},
    "model": {"base", "runtime"},
    "hf": {"base", "runtime", "model"},
    "programs": {"base", "data", "recipes", "runtime", "model", "hf"},
}
NO_JAX_LAYERS = ("base",)
JAX_FAMILY = ("jax", "jaxlib", "flax", "optax", "orbax")


def module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(REPO).with_suffix("").parts)
  if parts[-1] == "__init__" and len(parts) > 2:
    parts = parts[:-1]  # moss_jax/model/__init__.py is moss_jax.model
  return ".".join(parts)


def layer_of(module: str) -> str | None:
  for layer, prefixes in LAYERS.items():
    for prefix in prefixes:
      if module == prefix or module.startswith(prefix + "."):
        return layer
  return None


def project_files() -> list[pathlib.Path]:
  return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


class Import:
  """One import statement's target module, where it is, and whether it sits in a function."""

  def __init__(self, path: pathlib.Path, node: ast.AST, target: str, local: bool):
    self.path, self.line, self.target, self.local = path, node.lineno, target, local

  @property
  def where(self) -> str:
    return f"{self.path.relative_to(REPO)}:{self.line}"


def _targets(node: ast.AST, module: str, is_package: bool) -> list[str]:
  if isinstance(node, ast.Import):
    return [alias.name for alias in node.names]
  base = node.module or ""
  if node.level:  # relative import
    package = module.split(".") if is_package else module.split(".")[:-1]
    package = package[:len(package) - (node.level - 1)]
    base = ".".join(package + ([base] if base else []))
  # `from pkg import sub` may name a submodule: count it as pkg.sub when that file exists.
  out = []
  for alias in node.names:
    sub = f"{base}.{alias.name}"
    out.append(sub if _is_project_module(sub) else base)
  return out


def _is_project_module(name: str) -> bool:
  path = REPO.joinpath(*name.split("."))
  return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(path: pathlib.Path) -> list[Import]:
  tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
  module = module_name(path)
  out: list[Import] = []

  def visit(node: ast.AST, local: bool) -> None:
    for child in ast.iter_child_nodes(node):
      if isinstance(child, (ast.Import, ast.ImportFrom)):
        for target in _targets(child, module, path.name == "__init__.py"):
          out.append(Import(path, child, target, local))
      inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
                                          ast.Lambda))
      visit(child, inner)

  visit(tree, False)
  return out


def project_graph() -> dict[str, list[Import]]:
  graph = {}
  for path in project_files():
    graph[module_name(path)] = [i for i in imports_of(path)
                                if i.target.split(".")[0] in PACKAGES]
  return graph


def _resolve(target: str, modules: set[str]) -> str:
  """The project module an import target names (a package's name stands for its __init__)."""
  if target in modules:
    return target
  if f"{target}.__init__" in modules:
    return f"{target}.__init__"
  return target


def test_every_module_has_a_layer():
  unplaced = [m for m in project_graph() if layer_of(m) is None]
  assert not unplaced, f"modules outside every layer (add them to LAYERS): {unplaced}"


def test_imports_follow_the_layer_order():
  graph = project_graph()
  bad = []
  for module, imports in graph.items():
    src = layer_of(module)
    for imp in imports:
      dst = layer_of(_resolve(imp.target, set(graph)))
      if dst is not None and dst != src and dst not in ALLOWED[src]:
        bad.append(f"{imp.where}: {module} ({src}) imports {imp.target} ({dst})")
  assert not bad, ("imports against the layer order of docs/architecture.md:\n  "
                   + "\n  ".join(bad))


def test_bottom_layer_does_not_import_jax():
  bad = []
  for path in project_files():
    if layer_of(module_name(path)) in NO_JAX_LAYERS:
      bad += [f"{i.where}: imports {i.target}" for i in imports_of(path)
              if i.target.split(".")[0] in JAX_FAMILY]
  assert not bad, "the bottom layer must stay free of JAX:\n  " + "\n  ".join(bad)


def test_no_import_cycles():
  graph = project_graph()
  modules = set(graph)
  edges = {m: {_resolve(i.target, modules): i for i in imports
               if _resolve(i.target, modules) in modules and _resolve(i.target, modules) != m}
           for m, imports in graph.items()}
  cycles = []
  state: dict[str, int] = {}  # 1 = on the stack, 2 = done
  stack: list[str] = []

  def dfs(m: str) -> None:
    state[m] = 1
    stack.append(m)
    for t, imp in sorted(edges[m].items()):
      if state.get(t) == 1:
        loop = stack[stack.index(t):] + [t]
        lines = [f"{edges[a][b].where}: {a} imports {b}" for a, b in zip(loop, loop[1:])]
        cycles.append(" -> ".join(loop) + "\n    " + "\n    ".join(lines))
      elif t not in state:
        dfs(t)
    stack.pop()
    state[m] = 2

  for m in sorted(edges):
    if m not in state:
      dfs(m)
  assert not cycles, "import cycles:\n  " + "\n  ".join(cycles)


def test_function_local_imports_say_why():
  """Imports belong at module top; one inside a function needs a comment (same or previous line)."""
  bad = []
  for path in project_files():
    lines = path.read_text(encoding="utf-8").splitlines()
    for imp in imports_of(path):
      if not imp.local:
        continue
      here, above = lines[imp.line - 1], lines[imp.line - 2] if imp.line > 1 else ""
      if "#" not in here and not above.strip().startswith("#"):
        bad.append(f"{imp.where}: {here.strip()}")
  assert not bad, ("function-local imports without a comment saying why (move them to the top "
                   "of the module, or say why not):\n  " + "\n  ".join(sorted(set(bad))))


@pytest.mark.parametrize("source,expected", [
    ("moss_jax/model/fake.py", "moss_jax.model.fake"),
    ("moss_jax/model/__init__.py", "moss_jax.model"),
    ("moss_jax/__init__.py", "moss_jax.__init__"),
])
def test_module_names(source, expected):
  assert module_name(REPO / source) == expected


def test_a_violation_is_found_with_its_line(tmp_path):
  """The checker itself: an upward import inside a function is found, with its line."""
  fake = tmp_path / "fake.py"
  fake.write_text("import os\n\n\ndef f():\n  from data_pipelines import pipeline\n")
  tree = ast.parse(fake.read_text())
  found = [(t, node.lineno) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
           for t in _targets(node, "moss_jax.model.fake", False)]
  assert found == [("data_pipelines.pipeline", 5)]
  assert layer_of("data_pipelines.pipeline") not in ALLOWED[layer_of("moss_jax.model.fake")]
