"""The package's import graph, read from the source with ``ast`` (every import, at module level or inside a
function; ``if TYPE_CHECKING:`` blocks are annotations only and do not count): no cycles, ``memory/`` knows
nothing of QEMU, and the Linux and idle layers never speak QMP/HMP themselves (issue 11)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
MODULES = {
    ".".join(p.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__"): p
    for p in SRC.rglob("*.py")
}


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node, except the bodies of ``if TYPE_CHECKING:``."""
    out: list[ast.AST] = []
    todo: list[ast.AST] = [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                todo.extend(child.orelse)
                continue
            todo.append(child)
    return out


def _imports(name: str) -> set[str]:
    deps: set[str] = set()
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    for node in _runtime_nodes(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            deps |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            subs = {f"{base}.{a.name}" for a in node.names} & MODULES.keys()
            deps |= subs
            if len(subs) < len(node.names):
                deps.add(base)
    return {d for d in deps if d in MODULES and d != name}


GRAPH = {name: _imports(name) for name in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def test_the_checker_sees_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    assert "vmsight.linux.kernel" in GRAPH["vmsight.linux.tasks"]      # it does read imports


def test_no_import_cycles() -> None:
    assert _cycles(GRAPH) == []


def test_memory_knows_no_qemu() -> None:
    bad = {(m, d) for m, ds in GRAPH.items() if m.startswith("vmsight.memory") for d in ds
           if d.startswith(("vmsight.qemu", "vmsight.vm", "vmsight.linux", "vmsight.cli"))}
    assert not bad


def test_linux_and_idle_do_not_speak_qmp() -> None:
    """They reach a target through its Python interface (Machine, VM methods), never QMP/HMP/RSP directly."""
    layers = ("vmsight.linux", "vmsight.idle")
    bad = {(m, d) for m, ds in GRAPH.items() if m.startswith(layers) for d in ds
           if d.startswith(("vmsight.qemu.qmp", "vmsight.qemu.rsp", "vmsight.qemu.monitors", "vmsight.cli"))}
    assert not bad
    calls = set()
    for m in MODULES:
        if m.startswith(layers):
            for node in ast.walk(ast.parse(MODULES[m].read_text())):
                if isinstance(node, ast.Attribute) and node.attr in ("qmp", "hmp", "execute"):
                    calls.add((m, node.lineno, node.attr))
    assert not calls


def test_no_module_shadows_a_builtin() -> None:
    """Importing ``pkg.x`` binds ``x`` in ``pkg``'s namespace: a submodule named ``list`` made every ``list(...)``
    in ``vmsight/linux/__init__.py`` call a module ("'module' object is not callable")."""
    import builtins

    assert not {m for m in MODULES if m.rpartition(".")[2] in dir(builtins)}
