"""The package layering (``LAYERS`` below): every import of our own modules, at the top of a file
or inside a function, read with ``ast``, points down the layers or within its package, and neither
the packages nor the modules import each other in a cycle. Outside ``cli/`` (whose commands import
lazily on purpose, see its docstring) our modules are imported at the top of a file; one imported
inside a function says why on its line (``# lazy: ...``: an import cycle).

    python tests/test_layering.py    # prints the package-level import graph
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "xtoken_nemo"
TOP = "xtoken_nemo"

# lowest first; a package may import its own modules and the packages of lower layers. Packages of
# one layer may import each other as long as the package graph has no cycle.
LAYERS = (
    ("compat", "errors"),  # usable by all
    ("tokenizers",),
    ("vocab", "align"),
    ("data",),
    ("losses",),
    ("models",),
    ("distill",),
    ("recipes", "launcher", "evaluation", "demo"),
    ("cli", "__main__"),  # the `xtoken` command: nothing below imports it
)
LAYER = {pkg: n for n, group in enumerate(LAYERS) for pkg in group}


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (``xtoken_nemo.x`` for ``x/__init__.py``)."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = (TOP, *path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Our modules that ``name`` imports anywhere in its file (top level or inside functions)."""
    found = set()
    package = name if _is_package(path) else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from pkg import mod` imports the module pkg.mod; `from pkg import name` only pkg
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` of an attribute path: its module
                target = target.rpartition(".")[0]
            if target.startswith(TOP + ".") and target != name:
                found.add(target)
    return found


def package_of(module: str) -> str:
    """``xtoken_nemo.vocab.build`` -> ``vocab``; top-level modules (``xtoken_nemo.errors``) are their own package."""
    return module.split(".")[1]


def module_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items() if name != TOP}


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for module, targets in graph.items():
        edges = out.setdefault(package_of(module), set())
        edges.update(package_of(t) for t in targets if package_of(t) != package_of(module))
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
            visit(v)
    return found


def _without_own_package_init(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """A module importing its own package's ``__init__`` (which re-exports that module) is how a
    package presents its names, not a cycle between two concepts: those edges are left out."""
    out = {}
    for module, targets in graph.items():
        out[module] = {t for t in targets if not module.startswith(t + ".")}
    return out


LAZY_EXEMPT = ("cli",)  # the commands import inside their functions (xtoken_nemo/cli/__init__.py)


def _is_ours(node: ast.Import | ast.ImportFrom) -> bool:
    if isinstance(node, ast.ImportFrom):
        return bool(node.level) or (node.module or "").split(".")[0] == TOP
    return any(alias.name.split(".")[0] == TOP for alias in node.names)


def unexplained_lazy_imports(path: Path) -> list[str]:
    """``file:line`` of each import of our modules inside a function of ``path`` whose lines carry no
    ``# lazy:`` comment saying why it is not at the top of the file."""
    source = path.read_text()
    lines = source.splitlines()
    found = set()
    for fn in ast.walk(ast.parse(source, filename=str(path))):
        if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.Import | ast.ImportFrom) and _is_ours(node):
                if not any("# lazy:" in line for line in lines[node.lineno - 1 : node.end_lineno]):
                    found.add((node.lineno, f"{path}:{node.lineno}: {lines[node.lineno - 1].strip()}"))
    return [text for _, text in sorted(found)]


def test_every_package_has_a_layer():
    missing = set(package_graph(module_graph())) - set(LAYER)
    assert not missing, f"give {sorted(missing)} a layer in LAYERS"


def test_no_upward_import():
    upward = [
        f"{module} ({package_of(module)}, layer {LAYER[package_of(module)]}) imports {target} "
        f"({package_of(target)}, layer {LAYER[package_of(target)]})"
        for module, targets in sorted(module_graph().items())
        for target in sorted(targets)
        if LAYER[package_of(target)] > LAYER[package_of(module)]
    ]
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


def test_no_cycle_between_packages():
    found = cycles(package_graph(module_graph()))
    assert not found, "packages that import each other: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_cycle_between_modules():
    found = cycles(_without_own_package_init(module_graph()))
    assert not found, "modules that import each other: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_checker_sees_imports_inside_functions(tmp_path):
    (tmp_path / "m.py").write_text(
        "def f():\n    from xtoken_nemo.vocab.build import BuildConfig\n    from . import x\n"
    )
    modules = dict.fromkeys(["xtoken_nemo.vocab.build", "xtoken_nemo.tokenizers.x", "xtoken_nemo.tokenizers.m"], Path())
    found = imports_of("xtoken_nemo.tokenizers.m", tmp_path / "m.py", modules)
    assert found == {"xtoken_nemo.vocab.build", "xtoken_nemo.tokenizers.x"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_imports_inside_functions_say_why():
    found = [
        hit
        for path in module_files().values()
        if path.relative_to(ROOT).parts[0] not in LAZY_EXEMPT
        for hit in unexplained_lazy_imports(path)
    ]
    assert not found, (
        "import these at the top of the file, or say why not on the line (`# lazy: cycle with ...`):\n"
        + "\n".join(found)
    )


def test_the_lazy_check_sees_imports_without_a_reason(tmp_path):
    (tmp_path / "m.py").write_text(
        "from xtoken_nemo.errors import XTokenError\n"
        "def f():\n"
        "    from xtoken_nemo.vocab import build\n"
        "    from . import x  # lazy: cycle with x\n"
        "    import xtoken_nemo.align\n"
        "    import torch\n"
        "    class C:\n"
        "        def g(self):\n"
        "            from xtoken_nemo.tokenizers import (  # lazy: cycle\n"
        "                load_tokenizer,\n"
        "            )\n"
    )
    found = unexplained_lazy_imports(tmp_path / "m.py")
    assert [hit.split(": ", 1)[0].rsplit(":", 1)[1] for hit in found] == ["3", "5"]


if __name__ == "__main__":
    packages = package_graph(module_graph())

    def order(p):
        return (LAYER.get(p, -1), p)

    for pkg in sorted(packages, key=order):
        print(f"{LAYER.get(pkg, '?')}  {pkg:<11} -> {', '.join(sorted(packages[pkg], key=order)) or '-'}")
    for cycle in cycles(packages) + cycles(_without_own_package_init(module_graph())):
        print("cycle:", " <-> ".join(cycle))
