"""The house rules, checked on the code itself: the layers import only downwards with no cycles, no module grows
past ~300 lines, and every DVC stage depends on each of our modules its command imports (so a change to code that
decides a stage's output re-runs that stage)."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml
from helpers import REPO

PACKAGES = ("stages", "medasr")
MAX_LINES = 320  # "about 300": a module past it is doing more than one job
# Modules that cannot change what a stage writes: log lines, and how an error message is redacted.
NOT_OUTPUT = {"medasr.log", "medasr.secrets"}


def module_files() -> dict[str, Path]:
    files = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Our modules `path` imports, at any depth in the file (lazy imports inside functions count too)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports(path, name, set(files)) for name, path in files.items()}


def closure(start: str, edges: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += edges[name]
    return seen


def layer(name: str) -> int:
    if name.startswith("stages"):
        return 3
    if name.startswith(("medasr.ops", "medasr.sources")):
        return 2
    return 1


def test_imports_run_down_the_layers_without_cycles():
    edges = graph()
    upward = [f"{a} -> {b}" for a, bs in edges.items() for b in bs if layer(b) > layer(a)]
    assert not upward, f"imports that run back up: {upward}"
    # a package's __init__ may import its own modules; any other path back to a module is a cycle
    cycles = [
        f"{a} <-> {b}"
        for a, bs in edges.items()
        for b in bs
        if a in closure(b, {k: {v for v in vs if not k.startswith(v + ".")} for k, vs in edges.items()})
        and not b.startswith(a + ".")
    ]
    assert not cycles, f"import cycles: {cycles}"


def test_no_module_is_over_about_300_lines():
    long = {
        str(p.relative_to(REPO)): n
        for p in module_files().values()
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_every_stage_depends_on_the_code_its_command_imports():
    from stages.cli import app  # noqa: F401  (the command line must import cleanly)

    edges, files = graph(), module_files()
    stage_modules = {"train": "stages.train.run"}
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for stage, spec in stages.items():
        deps = [d.split("#")[0].strip().rstrip("/") for d in spec["deps"]]
        needed = closure(stage_modules.get(stage, f"stages.{stage}"), edges) - NOT_OUTPUT
        paths = [str(files[m].relative_to(REPO)) for m in needed if files[m].name != "__init__.py"]
        missing = sorted(p for p in paths if not any(p == d or p.startswith(d + "/") for d in deps))
        assert not missing, f"dvc.yaml stage {stage} imports but does not depend on {missing}"
