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


@pytest.mark.parametrize("module", ["robust_transfer.bounds", "robust_transfer.threat"])
def test_the_theory_depends_on_torch_only(module: str) -> None:
    allowed = {"robust_transfer.checks", "robust_transfer.errors", "robust_transfer.noise"}
    assert _reach(GRAPH, module) <= allowed
