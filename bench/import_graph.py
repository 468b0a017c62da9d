"""The project's import graph: who imports whom, whether it has a cycle, and which imports hide in functions.

Every module of ``stream``, ``online_models`` and ``gpu_scorer`` is parsed (not imported), so
an import inside a function counts like one at the top. The script prints the package
layering, each module's project imports, any cycle between modules or between packages, and
every project import made inside a function; it exits 1 when there is a cycle or such an
import, so CI can run it.

    python bench/import_graph.py            # the report
    python bench/import_graph.py --dot      # Graphviz source of the module graph

The layers the project keeps (docs/architecture.md): ``online_models`` (the pure core)
imports nothing of the other two; ``gpu_scorer`` may import ``online_models``; ``stream``
may import both.

Heavy third-party imports (torch, matplotlib) may stay lazy, so that a worker installed
without the ``train`` extra runs. A project module that imports torch at its top (the
*torch-bound* modules: the Transformer's definition, training and export) stands for torch:
importing it inside a function is listed apart, as allowed, not as a problem.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

PACKAGES = ("online_models", "gpu_scorer", "stream")
#: third-party packages heavy enough to import lazily (a worker runs without torch)
HEAVY = {"torch"}
#: a package may import only itself and the packages listed for it
LAYERS = {"online_models": set(), "gpu_scorer": {"online_models"}, "stream": {"online_models", "gpu_scorer"}}
ROOT = Path(__file__).resolve().parent.parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _resolve(current: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def heavy_at_top(path: Path) -> bool:
    """Whether ``path`` imports a :data:`HEAVY` package outside any function."""
    tree = ast.parse(path.read_text(), str(path))
    for node in tree.body:
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] in HEAVY for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] in HEAVY:
            return True
    return False


def torch_bound(mods: dict[str, Path], edges: dict[str, list[tuple[str, int, bool]]]) -> set[str]:
    """Modules that import a heavy package at their top, directly or through project modules."""
    bound = {m for m, p in mods.items() if heavy_at_top(p)}
    changed = True
    while changed:
        changed = False
        for m, e in edges.items():
            if m not in bound and any(t in bound for t, _, inside in e if not inside):
                bound.add(m)
                changed = True
    return bound


def imports_of(name: str, path: Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """``(imported project module, line, inside a function)`` for each import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    out: list[tuple[str, int, bool]] = []

    def target(mod: str) -> str | None:
        while mod and mod not in known:
            mod = mod.rpartition(".")[0]
        return mod or None

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if (mod := target(alias.name)) and mod != name:
                        out.append((mod, child.lineno, in_function))
            elif isinstance(child, ast.ImportFrom):
                base = _resolve(name, path.name == "__init__.py", child)
                for alias in child.names:  # "from pkg import module" imports the module
                    full = f"{base}.{alias.name}" if base else alias.name
                    mod = full if full in known else target(base)
                    if mod and mod != name:
                        out.append((mod, child.lineno, in_function))
            else:
                visit(child, nested)

    visit(tree, False)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    sys.setrecursionlimit(10_000)

    def strong(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dot", action="store_true", help="print Graphviz source of the module graph")
    args = parser.parse_args(argv)
    mods = modules()
    known = set(mods)
    edges = {m: imports_of(m, p, known) for m, p in mods.items()}
    # a module imports its package's __init__ implicitly; that edge is not a dependency it chose
    graph = {m: {t for t, _, _ in e if not m.startswith(t + ".")} for m, e in edges.items()}
    if args.dot:
        print("digraph imports {\n  rankdir=LR;")
        for m in sorted(graph):
            for t in sorted(graph[m]):
                print(f'  "{m}" -> "{t}";')
        print("}")
        return 0
    package_graph: dict[str, set[str]] = {p: set() for p in PACKAGES}
    for m, targets in graph.items():
        for t in targets:
            if t.split(".")[0] != m.split(".")[0]:
                package_graph[m.split(".")[0]].add(t.split(".")[0])
    print("layers (a package imports only those after its arrow):")
    for pkg in PACKAGES:
        print(f"  {pkg} -> {', '.join(sorted(package_graph[pkg])) or '(nothing of the project)'}")
    print(f"\nmodules: {len(mods)}, project imports: {sum(len(g) for g in graph.values())}")
    for m in sorted(graph):
        print(f"  {m}: {', '.join(sorted(graph[m])) or '-'}")
    module_cycles = cycles(graph)
    package_cycles = cycles(package_graph)
    wrong_layer = sorted((m, t) for m, ts in graph.items() for t in ts
                         if t.split(".")[0] != m.split(".")[0] and t.split(".")[0] not in LAYERS[m.split(".")[0]])
    bound = torch_bound(mods, edges)
    lazy = sorted({(m, t, line) for m, e in edges.items() for t, line, inside in e if inside})
    in_functions = [(m, t, line) for m, t, line in lazy if t not in bound]
    lazy_heavy = [(m, t, line) for m, t, line in lazy if t in bound]
    print(f"\nmodule cycles: {len(module_cycles)}")
    for c in module_cycles:
        print("  " + " <-> ".join(c))
    print(f"package cycles: {len(package_cycles)}")
    for c in package_cycles:
        print("  " + " <-> ".join(c))
    print(f"imports against the layers: {len(wrong_layer)}")
    for m, t in wrong_layer:
        print(f"  {m} -> {t}")
    print(f"project imports inside functions: {len(in_functions)}")
    for m, t, line in in_functions:
        print(f"  {mods[m].relative_to(ROOT)}:{line} imports {t}")
    print(f"torch-bound modules ({', '.join(sorted(HEAVY))} at their top): {', '.join(sorted(bound)) or '-'}")
    print(f"lazy imports of torch-bound modules (allowed: they stand for torch): {len(lazy_heavy)}")
    for m, t, line in lazy_heavy:
        print(f"  {mods[m].relative_to(ROOT)}:{line} imports {t}")
    problems = len(module_cycles) + len(package_cycles) + len(wrong_layer) + len(in_functions)
    print("\nacyclic, layered, nothing imported inside a function" if not problems else f"\n{problems} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
