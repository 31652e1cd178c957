"""The package's imports flow one way: cli -> jobs -> {scoring, engines, data, store,
models, distributed, inputs} -> base, with no cycle (function-level imports count), no
module reaching for another's underscore names, and tests using public names only."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "ghostproj"
TESTS = Path(__file__).resolve().parent
TOP = {"cli", "__main__", "__init__"}  # the command line and the package's public API
# a subpackage may not import from these
FORBIDDEN = {
    "scoring": {"jobs", "cli"}, "engines": {"jobs", "cli"}, "models": {"jobs", "cli"},
    "distributed": {"jobs", "cli", "engines"}, "inputs": {"jobs", "cli"},
    "data": {"jobs", "cli", "engines", "scoring"}, "store": {"jobs", "cli", "engines", "scoring"},
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"] = path
    return found


def _imports(name: str, path: Path, modules: dict) -> list[tuple[str, str, int]]:
    """(imported module, imported name, line) of every ghostproj import in the file."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    if name == "__init__":
        package = []
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").startswith("ghostproj"):
                target = node.module[len("ghostproj."):] if node.module != "ghostproj" else "__init__"
            else:
                continue
            for alias in node.names:
                full = f"{target}.{alias.name}" if target else alias.name
                out.append((full if full in modules else target or "__init__", alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name[len("ghostproj."):], "*", node.lineno) for a in node.names
                    if a.name.startswith("ghostproj.")]
    return [(t, n, line) for t, n, line in out if t in modules]


def _layer(module: str) -> str:
    return module.split(".")[0]


def test_imports_flow_one_way_without_cycles():
    modules = _modules()
    graph, problems = {}, []
    for name, path in modules.items():
        edges = _imports(name, path, modules)
        graph[name] = {t for t, _, _ in edges if t != name}
        for target, what, line in edges:
            where = f"{path.relative_to(SRC)}:{line}"
            if _layer(target) in FORBIDDEN.get(_layer(name), ()):
                problems.append(f"{where} imports {target} (upward)")
            if _layer(target) in TOP and _layer(name) not in TOP:
                problems.append(f"{where} imports {target} (upward)")
            if what.startswith("_") and not what.startswith("__") and target != name:
                problems.append(f"{where} imports the private {what} of {target}")
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                problems.append("cycle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not problems, "\n".join(problems)


def test_tests_use_public_names_only():
    problems = []
    for path in TESTS.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ghostproj"):
                problems += [f"{path.name}:{node.lineno} {a.name}" for a in node.names
                             if a.name.startswith("_") and not a.name.startswith("__")]
    assert not problems, problems


def test_functions_and_modules_stay_small():
    """No function over 60 lines, no module over 450, and the command line's dispatch (the
    commands and the app, parsing and dispatch only) none over 300."""
    problems = []
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        limit = 300 if path.parent.name == "cli" and path.stem in ("app", "run_commands", "store_commands") else 450
        if text.count("\n") > limit:
            problems.append(f"{path.relative_to(SRC)}: {text.count(chr(10))} lines (at most {limit})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                problems.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name}: "
                                f"{node.end_lineno - node.lineno + 1} lines")
    assert not problems, "\n".join(problems)
