"""The layering: amft_lib (the library) never imports the orchestration layer — kfp, `components`
or `pipelines` — at any level, including imports inside functions; components import only the
library; pipelines import components and the library. Checked on the source with `ast`, so a lazy
import inside a function cannot hide."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ORCHESTRATION = ("kfp", "components", "pipelines")


def imported_modules(path: Path) -> set[str]:
    """Every absolute module name an `import` or `from … import` anywhere in the file names."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def top_packages(folder: str) -> dict[str, set[str]]:
    return {str(p.relative_to(ROOT)): {name.split(".")[0] for name in imported_modules(p)}
            for p in sorted((ROOT / folder).rglob("*.py"))}


def test_the_library_never_imports_orchestration_code():
    offenders = {path: sorted(tops & set(ORCHESTRATION)) for path, tops in top_packages("amft_lib").items()
                 if tops & set(ORCHESTRATION)}
    assert not offenders, f"amft_lib imports the orchestration layer: {offenders}"


def test_components_import_only_the_library_and_kfp():
    offenders = {path: "pipelines" for path, tops in top_packages("components").items() if "pipelines" in tops}
    assert not offenders, f"components import the DAG (an import loop): {offenders}"


@pytest.mark.parametrize("source", ["import kfp\n", "def f():\n    from pipelines.build import load_pipeline\n",
                                    "def f():\n    import components.train\n"])
def test_the_check_sees_lazy_imports(tmp_path, source):
    """The walker finds an orchestration import however deep it sits (so the tests above can fail)."""
    path = tmp_path / "m.py"
    path.write_text(source)
    assert {name.split(".")[0] for name in imported_modules(path)} & set(ORCHESTRATION)


def test_no_command_modules_left_at_the_library_root():
    """CLI modules live in amft_lib/cli/ (one per group); the old *_commands.py files are gone."""
    assert not list((ROOT / "amft_lib").glob("*_commands.py"))
    assert not (ROOT / "amft_lib" / "data" / "commands.py").exists()


def test_test_modules_have_unique_basenames():
    """pytest imports test files without packages (rootdir-relative basenames), so two
    `test_x.py` in different test folders make collection of the second one fail for the whole run
    — which is how one CI run died before running a single test."""
    seen: dict[str, list[str]] = {}
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        seen.setdefault(path.name, []).append(str(path.relative_to(ROOT)))
    clashes = {name: paths for name, paths in seen.items() if len(paths) > 1}
    assert not clashes, f"test modules share a basename (rename one): {clashes}"


# ── no import circles inside amft_lib ───────────────────────────────────────────────────────────────


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def library_import_graph(root: Path, package: str = "amft_lib") -> dict[str, set[str]]:
    """module → the modules of `package` it imports, at module level or inside any function (a lazy
    import still runs, and still ties the two modules together). `from pkg import name` counts as an
    import of the submodule `pkg.name` when that is a module, else of `pkg` itself."""
    files = {_module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        is_pkg = path.name == "__init__.py"
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package holding this module
                    anchor = module.split(".") if is_pkg else module.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]
            else:
                continue
            for name in names:
                while name and name not in files:  # `import amft_lib.x.attr` → the module part
                    name = name.rpartition(".")[0]
                if name and name.split(".")[0] == package and name != module:
                    targets.add(name)
        graph[module] = targets
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every group of modules that import each other, directly or round a loop (Tarjan's strongly
    connected components with more than one member), each sorted; the groups sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(groups)


def test_amft_lib_has_no_import_circles():
    """A circle (a imports b, b imports a, at any depth) makes every change to one of them a change to
    both and breaks at import time once either import moves to module level. Issue 22 broke the last
    three (reports ↔ evaluate, model_source ↔ model, scale_out ↔ trainjob_watch)."""
    graph = library_import_graph(ROOT)
    assert len(graph) > 30 and graph["amft_lib.trainer"], "the walker found the library's modules and imports"
    assert not import_cycles(graph), f"import circles inside amft_lib: {import_cycles(graph)}"


@pytest.mark.parametrize(("files", "expected"), [
    # a lazy (function-level) import closes the circle
    ({"a.py": "from amft_lib import b\n", "b.py": "def f():\n    from amft_lib.a import x\n"},
     [["amft_lib.a", "amft_lib.b"]]),
    # three modules round a loop, one through `import amft_lib.x.y` and one relative import
    ({"a.py": "import amft_lib.sub.c\n", "sub/__init__.py": "", "sub/c.py": "from .. import b\n",
      "b.py": "def g():\n    import amft_lib.a\n"},
     [["amft_lib.a", "amft_lib.b", "amft_lib.sub.c"]]),
    # one direction only: no circle
    ({"a.py": "from amft_lib import b\n", "b.py": "import json\n"}, []),
])
def test_the_circle_check_sees_a_planted_circle(tmp_path, files, expected):
    """The walker and the cycle search find a circle planted in a throw-away copy of the package layout,
    so the test above can fail."""
    for name, source in {"__init__.py": "", **files}.items():
        path = tmp_path / "amft_lib" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    assert import_cycles(library_import_graph(tmp_path)) == expected


# ── the recipe shape stays readable (issue 22) ───────────────────────────────────────────────────


def function_lengths(package: Path) -> dict[str, int]:
    """'path:qualname' → lines, for every function and method under `package`."""
    lengths: dict[str, int] = {}
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text())

        def visit(node: ast.AST, prefix: str, rel: str = str(path.relative_to(package.parent))) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    name = f"{prefix}{child.name}"
                    if not isinstance(child, ast.ClassDef):
                        lengths[f"{rel}:{name}"] = child.end_lineno - child.lineno + 1
                    visit(child, name + ".")

        visit(tree, "")
    return lengths


def test_no_library_function_is_longer_than_120_lines_and_the_loop_fits_a_screen():
    lengths = function_lengths(ROOT / "amft_lib")
    assert len(lengths) > 300, "the walker found the library's functions"
    assert {name: n for name, n in lengths.items() if n > 120} == {}
    assert lengths["amft_lib/trainer.py:run_train"] <= 60  # check → setup → restore → step loop → teardown


def test_function_lengths_counts_nested_and_methods(tmp_path):
    (tmp_path / "m.py").write_text("class A:\n    def f(self):\n        def g():\n            return 1\n"
                                   "        return g\n")
    assert {k.split(":")[1]: v for k, v in function_lengths(tmp_path).items()} == {"A.f": 4, "A.f.g": 2}
