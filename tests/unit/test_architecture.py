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
