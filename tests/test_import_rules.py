"""The import rules of docs/architecture.md, checked on the source files (ast, nothing is imported).

- An engine module (``selfage_cli/<package>/engine/``) never sees a project: it imports no
  ``selfage_cli.project`` or ``selfage_cli.manifest``, no stage-side module of any package (only other
  engine modules and the configs/prompts it is given), and nothing of the CLI or the demo.
- No engine function takes a project: no parameter named ``project`` or annotated ``Project`` (the stage
  looks up what the engine needs in the manifest and passes it plainly, e.g. the DEX weights' path).
- Nothing outside ``selfage_cli/cli/`` imports ``selfage_cli.cli`` (``__main__`` starts it).
- The packages import each other without a cycle.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "selfage_cli"
PACKAGES = ("faces", "ages", "train", "edit", "eval")  # the stage packages, each with an engine/
# Stage-side modules an engine may import: the configs and prompts it is handed.
ENGINE_VOCABULARY = {"selfage_cli.edit.config", "selfage_cli.edit.prompts", "selfage_cli.train.config"}
# Top-level modules that orchestrate stages (like the CLI); everything else top-level is the shared core.
APPLICATION = {"selfage_cli.demo", "selfage_cli.doctor", "selfage_cli.__main__"}
NOT_FOR_ENGINES = {"selfage_cli.project", "selfage_cli.manifest", "selfage_cli.cli", *APPLICATION}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


MODULES = all_modules()


def imports_of(path: Path) -> set[str]:
    """Every ``selfage_cli`` module a file imports, at the top or inside a function (``from selfage_cli.x
    import y`` counts as ``selfage_cli.x.y`` when that is a module, else as ``selfage_cli.x``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "selfage_cli")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] != "selfage_cli":
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
    return found


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def is_engine(name: str) -> bool:
    return any(within(name, f"selfage_cli.{package}.engine") for package in PACKAGES)


def package_of(name: str) -> str:
    """The node of the package graph: a stage package, the CLI, an application module, or the core."""
    parts = name.split(".")
    if len(parts) > 1 and parts[1] in (*PACKAGES, "cli"):
        return parts[1]
    return name if name in APPLICATION else "core"


def test_the_rules_see_the_layout() -> None:
    for package in PACKAGES:
        engine = [name for name in MODULES if within(name, f"selfage_cli.{package}.engine") and name.count(".") == 3]
        assert engine, f"selfage_cli/{package}/engine/ holds no module"
        assert f"selfage_cli.{package}.stage" in MODULES
    assert "selfage_cli.project" in imports_of(MODULES["selfage_cli.edit.stage"])


def test_engines_never_see_a_project() -> None:
    broken = []
    for name, path in MODULES.items():
        if not is_engine(name):
            continue
        for imported in sorted(imports_of(path)):
            stage_side = package_of(imported) in PACKAGES and not is_engine(imported)
            if any(within(imported, banned) for banned in NOT_FOR_ENGINES) or (
                stage_side and imported not in ENGINE_VOCABULARY
            ):
                broken.append(f"{name} imports {imported}")
    assert not broken, "engine modules must not reach the project, a stage or the CLI:\n" + "\n".join(broken)


def project_parameters(path: Path) -> list[str]:
    """``function(parameter)`` for every parameter of a function in the file named ``project`` or annotated with
    ``Project`` (``Project``, ``Project | None``, ``"Project"``, ``selfage_cli.project.Project``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        args = node.args
        for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
            if arg is None:
                continue
            annotation = ast.unparse(arg.annotation) if arg.annotation is not None else ""
            if arg.arg == "project" or re.search(r"\bProject\b", annotation):
                found.append(f"{getattr(node, 'name', 'lambda')}({arg.arg}: {annotation or '?'})")
    return found


def test_no_engine_function_takes_a_project() -> None:
    broken = [
        f"{name}: {where}" for name, path in MODULES.items() if is_engine(name) for where in project_parameters(path)
    ]
    assert not broken, "engine functions must not take a project (pass what they need):\n" + "\n".join(broken)


def test_the_parameter_rule_sees_a_project(tmp_path: Path) -> None:
    source = tmp_path / "engine.py"
    source.write_text(
        "def a(x, project=None): ...\n"
        "def b(where: 'Project | None'): ...\n"
        "def c(*, p: selfage_cli.project.Project): ...\n"
        "def d(projection, projects: int): ...\n"
    )
    assert project_parameters(source) == [
        "a(project: ?)",
        "b(where: 'Project | None')",
        "c(p: selfage_cli.project.Project)",
    ]


def test_nothing_outside_the_cli_imports_it() -> None:
    broken = [
        f"{name} imports {imported}"
        for name, path in MODULES.items()
        if not within(name, "selfage_cli.cli") and name != "selfage_cli.__main__"
        for imported in sorted(imports_of(path))
        if within(imported, "selfage_cli.cli")
    ]
    assert not broken, "the library must not import the CLI:\n" + "\n".join(broken)


def test_no_import_cycle_between_packages() -> None:
    edges: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        source = package_of(name)
        for imported in imports_of(path):
            target = package_of(imported)
            if target != source:
                edges.setdefault(source, set()).add(target)

    def cycle_from(start: str, node: str, seen: tuple[str, ...]) -> tuple[str, ...] | None:
        for nxt in sorted(edges.get(node, ())):
            if nxt == start:
                return (*seen, nxt)
            if nxt not in seen:
                found = cycle_from(start, nxt, (*seen, nxt))
                if found:
                    return found
        return None

    cycles = [" -> ".join(c) for start in sorted(edges) if (c := cycle_from(start, start, (start,)))]
    assert not cycles, "import cycles between packages:\n" + "\n".join(cycles)
