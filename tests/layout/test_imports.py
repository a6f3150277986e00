"""Dependencies run one way: types/clock -> workload -> sched -> sim/engine/profiling -> metrics
-> app (config, experiment, api, cli, serve, ...). Walks every import in src/lemix, including
imports inside functions (a lazy import is still a dependency), and fails on a cycle or on a
module importing from a higher layer."""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"

# layer of a module: its longest matching prefix; anything not listed is an application module
LAYERS = {
    "lemix": 0, "lemix.types": 0, "lemix.clock": 0,
    "lemix.workload": 1,
    "lemix.sched": 2,
    "lemix.sim": 3, "lemix.engine": 3, "lemix.profiling": 3,
    "lemix.metrics": 4,
}
APP = 5


def modules() -> dict[str, Path]:
    out = {}
    for path in (SRC / "lemix").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def layer(module: str) -> int:
    best, level = -1, APP
    for prefix, lv in LAYERS.items():
        if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
            if prefix == "lemix" and module != "lemix":
                continue   # the root package file is layer 0; its subpackages are placed above
            best, level = len(prefix), lv
    return level


def imports_of(path: Path, mods: dict[str, Path]) -> set[str]:
    """lemix modules a file imports; `from pkg import sub` counts as importing pkg.sub."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("lemix"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lemix"):
            subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in mods]
            if len(subs) < len(node.names):
                found.add(node.module)   # names defined in the module (or package file) itself
            found.update(subs)
    return {m for m in found if m in mods}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports_of(p, mods) - {m} for m, p in mods.items()}


def test_no_module_imports_from_a_higher_layer():
    upward = sorted(f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
                    for m, deps in graph().items() for d in deps if layer(d) > layer(m))
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}   # 1: on the stack, 2: done
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(g[m]):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [])
    assert not cycles, "\n".join(cycles)


def test_the_walker_sees_lazy_imports_and_submodules(tmp_path):
    """The checks above can fail: a function-level import and a `from pkg import sub` count."""
    mods = {"lemix.a": tmp_path / "a.py", "lemix.pkg": tmp_path / "p.py", "lemix.pkg.sub": tmp_path / "s.py"}
    mods["lemix.a"].write_text("def f():\n    from lemix.pkg import sub\n")
    assert imports_of(mods["lemix.a"], mods) == {"lemix.pkg.sub"}
    assert layer("lemix.sched.scheduler") == 2 and layer("lemix.serve.app") == APP and layer("lemix") == 0
