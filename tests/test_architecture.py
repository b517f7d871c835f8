"""The package's shape: no import cycles, no reaching into another module's private names,
methods reach the engine only through `Scan`, and docs/architecture.md lists every module."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import cnnscan
import cnnscan.methods

SRC = Path(cnnscan.__file__).parent
ROOT = SRC.parent.parent


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in SRC.rglob("*.py")}


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import that runs (module level or inside functions), not those under
    `if TYPE_CHECKING:`."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                found.append(child)
            visit(child)

    visit(tree)
    return found


def absolute(node: ast.ImportFrom, importer: str) -> str:
    if not node.level:
        return node.module or ""
    package = importer if MODULES[importer].name == "__init__.py" else importer.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def edges(importer: str) -> set[str]:
    """The cnnscan modules `importer` imports when it runs."""
    tree = ast.parse(MODULES[importer].read_text("utf-8"))
    out = set()
    for node in runtime_imports(tree):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names if alias.name in MODULES}
            continue
        base = absolute(node, importer)
        for alias in node.names:
            target = f"{base}.{alias.name}"
            out.add(target if target in MODULES else base)
    return {name for name in out if name in MODULES and name != importer}


def test_the_package_has_no_import_cycle():
    graph = {name: edges(name) for name in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def strongconnect(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                strongconnect(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for name in sorted(graph):
        if name not in index:
            strongconnect(name)
    assert not cycles, f"import cycles: {cycles}"


def test_a_cycle_is_found_when_there_is_one():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    seen, path = set(), []

    def cyclic(node: str) -> bool:
        if node in path:
            return True
        if node in seen:
            return False
        seen.add(node)
        path.append(node)
        found = any(cyclic(other) for other in graph[node])
        path.pop()
        return found

    assert cyclic("a")
    assert edges("cnnscan.scan") >= {"cnnscan.models", "cnnscan.engine.working_copy"}


def test_no_module_imports_a_private_name_of_another():
    offenders = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text("utf-8"))
        aliases = {}
        for node in runtime_imports(tree):
            if isinstance(node, ast.ImportFrom):
                base = absolute(node, name)
                if not base.startswith("cnnscan"):
                    continue
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        offenders.append(f"{name}: from {base} import {alias.name}")
                    if f"{base}.{alias.name}" in MODULES:
                        aliases[alias.asname or alias.name] = f"{base}.{alias.name}"
            else:
                for alias in node.names:
                    if alias.name.startswith("cnnscan"):
                        aliases[alias.asname or alias.name.split(".")[0]] = alias.name
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                offenders.append(f"{name}: {node.value.id}.{node.attr}")
    assert not offenders, offenders


def test_no_test_module_imports_another():
    """Shared test code lives in tests/helpers.py: a test module imported by another runs
    its module-level set-up twice and ties two files' fixtures together."""
    offenders = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            names = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            offenders += [f"{path.name}: {name}" for name in names if name.startswith("test_")]
    assert not offenders, offenders


def test_methods_reach_the_engine_only_through_the_scan():
    offenders = [
        f"{name} imports {target}"
        for name in MODULES
        if name.startswith("cnnscan.methods")
        for target in edges(name)
        if target.startswith("cnnscan.engine")
    ]
    assert not offenders, offenders


def test_the_architecture_page_lists_every_module_and_nothing_else():
    page = (ROOT / "docs" / "architecture.md").read_text("utf-8")
    listed = set(re.findall(r"`(cnnscan(?:/[\w]+)*(?:\.py|/))`", page))
    actual = set()
    for path in SRC.rglob("*.py"):
        relative = path.relative_to(SRC.parent)
        if path.name == "__init__.py":
            if path.parent != SRC:
                actual.add(f"{relative.parent.as_posix()}/")
        else:
            actual.add(relative.as_posix())
    assert listed == actual, (
        f"missing from docs/architecture.md: {sorted(actual - listed)}; "
        f"listed but not in the tree: {sorted(listed - actual)}"
    )


def test_the_readme_methods_table_is_the_registry():
    """A new method appears in the README's table in its family's row (and nowhere else)."""
    readme = (ROOT / "README.md").read_text("utf-8")
    section = readme.split("## Methods", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0] in cnnscan.methods.FAMILIES:
            rows[cells[0]] = sorted(re.findall(r"`(\w+)`", cells[1]))
    registry = {
        family: sorted(info.name for info in cnnscan.list_methods(family))
        for family in cnnscan.methods.FAMILIES
    }
    assert rows == {family: names for family, names in registry.items() if names}
