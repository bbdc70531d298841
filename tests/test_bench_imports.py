"""bench/ imports one way: the modules' import graph, read with `ast`, has no cycle.

Every import counts, those inside functions too: an import moved into a function to dodge a cycle
still closes it here.
"""
import ast
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _bench_imports(path: Path, modules: set[str]) -> set[str]:
    """The bench modules `path` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:       # from . import x / from .x import y
            names = [node.module] if node.module else [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith(
                "longlive_triton.bench"):
            rest = node.module.removeprefix("longlive_triton.bench").lstrip(".")
            names = [rest.split(".")[0]] if rest else [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name.removeprefix("longlive_triton.bench.").split(".")[0] for a in node.names
                     if a.name.startswith("longlive_triton.bench.")]
        else:
            continue
        found |= {name.split(".")[0] for name in names} & modules
    return found


def import_graph(folder: Path = BENCH) -> dict[str, set[str]]:
    modules = {p.stem for p in folder.glob("*.py")}
    return {p.stem: _bench_imports(p, modules) - {p.stem} for p in folder.glob("*.py")}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle as the path of modules that closes it, or None (depth-first search)."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [node, nxt] if nxt in path else path + [node, nxt]
            if nxt not in state:
                cycle = visit(nxt, path + [node])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node, [])
            if cycle:
                return cycle
    return None


def test_bench_imports_have_no_cycle():
    graph = import_graph()
    assert {"cli", "measure", "e2e", "e2e_stock", "e2e_vae", "vae"} <= set(graph)
    assert find_cycle(graph) is None, f"bench/ import cycle: {' -> '.join(find_cycle(graph))}"
    assert not graph["measure"] & {"cli", "e2e", "e2e_stock", "e2e_vae", "vae", "multi_gpu"}


def test_the_cycle_finder_sees_a_function_level_import(tmp_path):
    (tmp_path / "a.py").write_text("from . import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from .a import g\n")
    (tmp_path / "c.py").write_text("import longlive_triton.bench.a\n")
    graph = import_graph(tmp_path)
    assert graph == {"a": {"b"}, "b": {"a"}, "c": {"a"}}
    assert find_cycle(graph) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a"}}) is None
