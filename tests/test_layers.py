"""The architecture's layering, checked on the import graph of the source."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "src" / "robust_transfer"
PACKAGE = "robust_transfer"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(2, len(parts))]


def _graph() -> dict[str, set[str]]:
    """Module -> the package modules importing it runs: what it names, the packages
    around those (their ``__init__`` runs too), but not the top-level package (the public
    API that gathers everything) nor the importer's own enclosing packages."""
    modules = {_module_name(path): path for path in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".")
                    base = base[: len(base) - node.level + (1 if is_package else 0)]
                    stem = ".".join([*base, node.module] if node.module else base)
                else:
                    stem = node.module or ""
                targets = [stem, *(f"{stem}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            for target in targets:
                if target in modules:
                    edges.add(target)
                    edges.update(_ancestors(target))
        own = {*_ancestors(name), name}
        graph[name] = {edge for edge in edges if edge not in own and edge != PACKAGE}
    return graph


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for nxt in graph.get(todo.pop(), set()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


GRAPH = _graph()


def _under(package: str) -> list[str]:
    return [name for name in GRAPH if name == package or name.startswith(package + ".")]


def test_the_graph_is_read() -> None:
    assert len(GRAPH) > 40
    assert "robust_transfer.report.render" in _reach(GRAPH, "robust_transfer.pipeline")
    assert "robust_transfer.study.runner" in _reach(GRAPH, "robust_transfer.pipeline")
    for caller in ("robust_transfer.study.runner", "robust_transfer.estimates.measurement"):
        assert "robust_transfer.estimates.evaluate" in _reach(GRAPH, caller)


@pytest.mark.parametrize("module", _under("robust_transfer.study"))
def test_the_study_never_imports_the_report(module: str) -> None:
    assert not {m for m in _reach(GRAPH, module) if m.startswith("robust_transfer.report")}


@pytest.mark.parametrize("module", _under("robust_transfer.report"))
def test_the_report_reads_records_and_the_store_only(module: str) -> None:
    assert not {m for m in _reach(GRAPH, module) if m.startswith("robust_transfer.study")}


def test_pretraining_never_imports_adaptation() -> None:
    assert "robust_transfer.training.adapt" not in _reach(
        GRAPH, "robust_transfer.training.pretrain"
    )


@pytest.mark.parametrize("module", _under("robust_transfer.theory"))
def test_the_theory_depends_on_torch_only(module: str) -> None:
    allowed = {"robust_transfer.core", *_under("robust_transfer.theory")}
    allowed |= {f"robust_transfer.core.{name}" for name in ("checks", "errors", "noise")}
    assert _reach(GRAPH, module) <= allowed


@pytest.mark.parametrize("module", _under("robust_transfer.core"))
def test_the_plumbing_imports_no_layer_above_it(module: str) -> None:
    assert {m for m in _reach(GRAPH, module) if not m.startswith("robust_transfer.core")} == set()


def test_the_top_level_holds_only_the_entry_points() -> None:
    flat = sorted(path.stem for path in ROOT.glob("*.py"))
    assert flat == ["__init__", "_version", "pipeline"]


@pytest.mark.parametrize("path", sorted(ROOT.rglob("*.py")), ids=lambda path: path.stem)
def test_no_module_is_over_400_lines(path: Path) -> None:
    assert len(path.read_text().splitlines()) <= 400
