"""The project's modules import one another without a circle, and at the top of the file.

Every top-level module is parsed (not imported) and each `import` / `from ... import` of another
top-level module is an edge, wherever it stands: at the top, inside a function or under
`if __name__ == "__main__":`. A circle means two modules each need the other; the issue #17
redesign removed the last ones (dataset <-> synthetic, main_train <-> main_infer <-> export).
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = {p.stem: p for p in sorted(ROOT.glob("*.py"))}
# Imports that may stay inside a function: optional or heavy dependencies that most runs never
# need, each with a comment where it stands saying so.
LAZY_ALLOWED = {"onnx", "onnxruntime", "tqdm"}


def imports_of(path: Path) -> list[tuple[str, int, bool]]:
    """(top-level name imported, line, inside a function) for every import in `path`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function |= {id(sub) for sub in ast.walk(node)} - {id(node)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(name.split(".")[0], node.lineno, id(node) in in_function) for name in names]
    return found


def project_graph() -> dict[str, set[str]]:
    return {
        name: {dep for dep, _, _ in imports_of(path) if dep in MODULES and dep != name}
        for name, path in MODULES.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_a_known_circle_and_none_in_a_chain():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_no_import_circle_among_the_project_modules():
    graph = project_graph()
    assert {"dataset", "synthetic", "main_train", "main_infer", "export"} <= set(graph)
    assert "synthetic" in graph["dataset"]  # the parse sees real edges
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


ENTRY_SCRIPTS = {"main_train", "main_infer", "resume_train"}


def test_no_module_imports_an_entry_script():
    # The entry scripts take what they share from library modules (training.train,
    # dataset.build_data, evaluation.evaluate_model, model.load_model), never from each other;
    # export.py is a library with a command line.
    graph = project_graph()
    assert ENTRY_SCRIPTS <= set(graph) and "training" in graph["resume_train"]
    for name, deps in graph.items():
        assert not deps & (ENTRY_SCRIPTS - {name}), (name, deps & ENTRY_SCRIPTS)


def test_imports_stand_at_the_top_of_each_module():
    lazy = [
        f"{name}.py:{line} imports {dep}"
        for name, path in MODULES.items()
        for dep, line, inside in imports_of(path)
        if inside and dep not in LAZY_ALLOWED
    ]
    assert not lazy, "imports inside functions:\n" + "\n".join(lazy)
