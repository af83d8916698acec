"""The package's import graph (docs/design.md §3): no cycle among the modules of ``src/ebft``, and every import of an
ebft module at the top of its file, so that the graph the files show is the graph Python runs."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _modules(src: Path) -> dict[str, Path]:
    """Dotted name -> file, for every module and package of ebft."""
    out = {}
    for path in (src / "ebft").rglob("*.py"):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imported(node: ast.AST, name: str, is_package: bool) -> list[str]:
    """The dotted names an import statement in module ``name`` reads (relative imports resolved)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        anchor = name.split(".") if is_package else name.split(".")[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join([*anchor, base] if base else anchor)
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def _owner(target: str, modules: dict[str, Path]) -> str | None:
    """The ebft module a dotted name lives in (``ebft.features.pool`` -> ``ebft.features``), if any."""
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def _edges(src: Path = SRC) -> tuple[dict[str, set[str]], list[str]]:
    """(module -> the ebft modules it imports, imports of ebft modules made inside a function or class)."""
    modules = _modules(src)
    edges: dict[str, set[str]] = {name: set() for name in modules}
    nested: list[str] = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = {id(node) for node in tree.body}
        top |= {id(n) for node in tree.body if isinstance(node, ast.If) for n in node.body}  # if TYPE_CHECKING:
        for node in ast.walk(tree):
            targets = _imported(node, name, path.name == "__init__.py")
            owners = {_owner(t, modules) for t in targets if t.split(".")[0] == "ebft"}
            # a module reaching its own package's __init__ (or itself) is no edge of the graph
            owners = {o for o in owners if o is not None and o != name and not name.startswith(o + ".")}
            edges[name] |= owners
            if id(node) not in top:
                nested += [f"{name} imports {owner} on line {node.lineno}" for owner in sorted(owners)]
    return edges, nested


def test_the_modules_of_ebft_import_each_other_without_a_cycle():
    edges, _ = _edges()
    assert len(edges) > 100  # the walk found the package: every module of src/ebft
    try:
        order = list(TopologicalSorter(edges).static_order())
    except CycleError as exc:
        raise AssertionError(f"import cycle: {' -> '.join(exc.args[1])}") from None
    position = {name: i for i, name in enumerate(order)}
    # A dependency comes before the module that imports it: the math before the modes, the modes before the CLI.
    assert position["ebft.features"] < position["ebft.rewards"] < position["ebft.strided.step"] < position["ebft.cli"]


def test_no_ebft_module_is_imported_inside_a_function():
    """One exception: the command's entry point sets the process environment before the CLI (and torch) load,
    so it imports the CLI inside its function (tests/test_entry.py checks what that is for)."""
    _, nested = _edges()
    entry = [line for line in nested if line.startswith("ebft.entry imports ebft.cli on line ")]
    assert len(entry) == 1
    assert [line for line in nested if line not in entry] == []


def test_the_walk_sees_a_cycle_and_a_nested_import(tmp_path):
    """The checks above can fail: two modules that import each other, one of them inside a function."""
    package = tmp_path / "ebft"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from ebft import b\n")
    (package / "b.py").write_text("def f():\n    from ebft.a import g\n")
    edges, nested = _edges(tmp_path)
    assert edges["ebft.a"] == {"ebft.b"} and edges["ebft.b"] == {"ebft.a"}
    assert nested == ["ebft.b imports ebft.a on line 2"]
    try:
        list(TopologicalSorter(edges).static_order())
    except CycleError:
        return
    raise AssertionError("the cycle a -> b -> a was not found")
