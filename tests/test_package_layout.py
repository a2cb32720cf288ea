"""The package's shape (README, "Folder layout"): imports between mslpipe's modules run one way, without circles,
the bottom floor imports nothing above it, and the ONNX Runtime predictor runs without torch."""

from __future__ import annotations

import ast
from pathlib import Path

import mslpipe

PACKAGE = Path(mslpipe.__file__).parent
# imports nothing from the project above it (architectures/ counts as one module here)
BOTTOM = {"errors", "io", "dicom", "plans", "metrics", "postprocess", "tables", "budget", "checkpoints",
          "architectures", "intensity", "brainmask", "synth_anatomy"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return "architectures" if parts[0] == "architectures" else parts[0]


def imports(path: Path, when_loaded: bool = False) -> tuple[set[str], set[str]]:
    """(mslpipe modules, other top-level packages) that a file imports anywhere, function bodies included, or with
    ``when_loaded`` only those its import runs (module level, outside functions and classes)."""
    own, other = set(), set()
    tree = ast.parse(path.read_text())
    nodes = ast.walk(tree) if not when_loaded else (
        n for stmt in tree.body if not isinstance(stmt, ast.FunctionDef | ast.ClassDef) for n in ast.walk(stmt))
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module:
            top, _, rest = node.module.partition(".")
            if top != "mslpipe":
                other.add(top)
            elif rest:
                own.add(rest.split(".")[0])
            else:
                own |= {a.name for a in node.names if a.name != "__version__"}
        elif isinstance(node, ast.Import):
            for alias in node.names:
                top, _, rest = alias.name.partition(".")
                (own.add(rest.split(".")[0]) if top == "mslpipe" and rest else other.add(top))
    return own, other


def graph() -> dict[str, set[str]]:
    g: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        if name in ("__init__", "__main__"):
            continue
        g.setdefault(name, set()).update(imports(path)[0] - {name, "__init__"})
    return g


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(g.get(node, ())):
            if state.get(dep) == 1:
                return path + [node, dep]
            if dep not in state and (found := visit(dep, path + [node])):
                return found
        state[node] = 2
        return None

    for node in sorted(g):
        if node not in state and (found := visit(node, [])):
            return found
    return None


def test_no_import_cycles():
    assert find_cycle(graph()) is None, " → ".join(find_cycle(graph()))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_bottom_floor_imports_nothing_above_it():
    g = graph()
    assert BOTTOM <= set(g), BOTTOM - set(g)
    above = {m: sorted(g[m] - BOTTOM) for m in BOTTOM if g[m] - BOTTOM}
    assert not above, above


def test_onnx_predictor_needs_no_torch():
    """Neither onnx_inference nor any module its import loads (transitively) imports torch or MONAI on loading."""
    own, other = imports(PACKAGE / "onnx_inference.py")
    assert "torch" not in other and "monai" not in other and "inference" not in own
    seen, todo = set(), ["onnx_inference"]
    while todo:
        name = todo.pop()
        seen.add(name)
        path = PACKAGE / f"{name}.py" if name != "architectures" else PACKAGE / "architectures" / "__init__.py"
        own, other = imports(path, when_loaded=True)
        assert not other & {"torch", "monai"}, f"{name} imports {sorted(other & {'torch', 'monai'})} when loaded"
        todo += sorted(own - seen - {"__init__"})
    assert {"io", "plans", "preprocess"} <= seen
