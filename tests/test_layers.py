"""The layering of issue 8, checked on every run.

- cicd > flows > tasks > blocks, and tasks/blocks never import flows or cicd: import-linter's
  contracts in pyproject.toml (`[tool.importlinter]`), run here as `lint-imports`.
- The services and libs never import the pipeline, and the pipeline never imports them. They are
  separate uv projects, not installed in the pipeline's environment, so import-linter cannot
  build their graph: their files are parsed with `ast` instead.

Each checker is also run once on a synthetic tree with an upward import, to prove it can fail.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ("cicd", "stack", "reconcile", "daemons", "flows", "tasks", "blocks", "core")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


@pytest.fixture(scope="session", autouse=True)
def prefect_server() -> None:
    """Overrides the conftest's: these tests read files and run a linter, no Prefect server."""


def _lint_imports(cwd: Path, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-logo", "--no-cache", str(config)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _imported_names(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """(line, dotted module) for every absolute import, at any depth, and import_module("x")."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:  # relative imports stay inside their package
                yield node.lineno, node.module
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            first = node.args[0]
            if (
                name in {"import_module", "__import__"}
                and isinstance(first, ast.Constant)
                and isinstance(first.value, str)
            ):
                yield node.lineno, first.value


def forbidden_imports(files: Iterable[Path], forbidden: Iterable[str], root: Path) -> list[str]:
    """'path:line imports module' for each import of a forbidden top-level package."""
    banned = set(forbidden)
    found = []
    for path in sorted(files):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except SyntaxError as exc:  # cannot tell what it imports: that is a finding too
            found.append(f"{path.relative_to(root)}:{exc.lineno} cannot be parsed: {exc.msg}")
            continue
        for line, module in _imported_names(tree):
            if module.split(".")[0] in banned:
                found.append(f"{path.relative_to(root)}:{line} imports {module}")
    return found


def _python_files(*dirs: Path) -> list[Path]:
    return [p for d in dirs for p in d.rglob("*.py") if ".venv" not in p.parts]


def _service_packages() -> set[str]:
    """The import names of the services and libs: services/*/src/* and libs/*/src/*."""
    return {
        p.name
        for pattern in ("services/*/src/*", "libs/*/src/*")
        for p in ROOT.glob(pattern)
        if p.is_dir() and (p / "__init__.py").is_file()
    }


def test_pipeline_layers_hold() -> None:
    """cicd > stack > reconcile > flows > tasks > blocks, the daemons beside them: the
    import-linter contracts in pyproject.toml are kept."""
    result = _lint_imports(ROOT, ROOT / "pyproject.toml")
    assert result.returncode == 0, f"lint-imports failed:\n{result.stdout}\n{result.stderr}"


def test_services_and_libs_never_import_the_pipeline() -> None:
    files = _python_files(ROOT / "services", ROOT / "libs")
    assert len(files) > 20, "found too few service files: has the layout moved?"
    found = forbidden_imports(files, (*PIPELINE, "tests"), ROOT)
    assert not found, "services/libs import the pipeline:\n" + "\n".join(found)


def test_pipeline_never_imports_services_or_libs() -> None:
    packages = _service_packages()
    assert {"servicekit", "authn", "api_gateway"} <= packages, packages
    files = _python_files(*(ROOT / name for name in PIPELINE))
    assert len(files) > 20, "found too few pipeline files: has the layout moved?"
    found = forbidden_imports(files, packages, ROOT)
    assert not found, "the pipeline imports a service or lib:\n" + "\n".join(found)


def test_the_bottom_layer_imports_nothing_above_it() -> None:
    """core (the error hierarchy, the records) is below every layer: it imports none of them."""
    paths = sorted((ROOT / "core").glob("*.py"))
    assert paths, "core/ is missing: has the layout moved?"
    above = tuple(name for name in PIPELINE if name != "core")
    for path in paths:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        relative = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level]
        assert not relative, f"{path.name} has relative imports at lines {relative}"
    found = forbidden_imports(paths, above, ROOT)
    assert not found, "core/ imports a layer above it:\n" + "\n".join(found)


def _write_tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


# A pipeline in miniature: every layer, blocks raising from the bottom layer.
_CLEAN_TREE = {
    "cicd/__init__.py": "",
    "cicd/stack_cli.py": "import stack.control\nimport reconcile.setup\nimport daemons.receiver\n",
    "stack/__init__.py": "",
    "stack/control.py": "import reconcile.setup\nimport flows.ci\n",
    "reconcile/__init__.py": "",
    "reconcile/setup.py": "import flows.ci\n",
    "daemons/__init__.py": "",
    "daemons/receiver.py": "from tasks import containers\n",
    "flows/__init__.py": "",
    "flows/ci.py": "from tasks import containers\nfrom blocks import config\n",
    "tasks/__init__.py": "",
    "tasks/containers.py": "from blocks.config import load\n",
    "blocks/__init__.py": "",
    "blocks/config.py": "from core.errors import ConfigError\n\ndef load(): ...\n",
    "core/__init__.py": "",
    "core/errors.py": "class ConfigError(Exception):\n    pass\n",
}


def test_lint_imports_passes_a_clean_tree_with_the_real_contracts(tmp_path: Path) -> None:
    """The contracts of pyproject.toml on a tree that keeps them (the exception included)."""
    _write_tree(tmp_path, _CLEAN_TREE)
    result = _lint_imports(tmp_path, ROOT / "pyproject.toml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 5 kept, 0 broken." in result.stdout, result.stdout


@pytest.mark.parametrize(
    ("name", "text", "violation"),
    [
        (
            "tasks/containers.py",  # an upward import hidden in a function still counts
            "def stack():\n    from cicd.stack_cli import x\n    return x\n",
            "tasks.containers -> cicd.stack_cli",
        ),
        ("flows/ci.py", "import cicd.stack_cli\n", "flows.ci -> cicd.stack_cli"),
        ("blocks/config.py", "from tasks.containers import y\n", "blocks.config -> tasks"),
        ("stack/control.py", "import cicd.stack_cli\n", "stack.control -> cicd.stack_cli"),
        ("reconcile/setup.py", "import stack.control\n", "reconcile.setup -> stack.control"),
        ("daemons/receiver.py", "import stack.control\n", "daemons.receiver -> stack.control"),
        ("flows/ci.py", "import daemons.receiver\n", "flows.ci -> daemons.receiver"),
        ("core/errors.py", "from blocks.config import load\n", "core.errors -> blocks.config"),
    ],
    ids=[
        "tasks-to-cicd-in-a-function",
        "flows-to-cicd",
        "blocks-to-tasks",
        "stack-to-cicd",
        "reconcile-to-stack",
        "daemons-to-stack",
        "flows-to-daemons",
        "core-to-blocks",
    ],
)
def test_lint_imports_fails_on_an_upward_import(
    tmp_path: Path, name: str, text: str, violation: str
) -> None:
    """The same contracts break when one file imports upward."""
    _write_tree(tmp_path, {**_CLEAN_TREE, name: text})
    result = _lint_imports(tmp_path, ROOT / "pyproject.toml")
    assert result.returncode == 1, result.stdout + result.stderr
    assert violation in result.stdout, result.stdout


def test_the_ast_checker_finds_every_form_of_import(tmp_path: Path) -> None:
    _write_tree(
        tmp_path,
        {
            "svc/src/svc/app.py": (
                "import os\n"
                "from . import tasks\n"  # relative: the service's own module, allowed
                "from .tasks import run\n"
                "import flows.ci as ci\n"
                "def f():\n"
                "    from blocks.config import load\n"
                "    import importlib\n"
                "    return importlib.import_module('cicd.stack')\n"
                "from tasksx import y\n"  # another package that merely starts alike
            ),
        },
    )
    found = forbidden_imports(tmp_path.rglob("*.py"), PIPELINE, tmp_path)
    assert found == [
        "svc/src/svc/app.py:4 imports flows.ci",
        "svc/src/svc/app.py:6 imports blocks.config",
        "svc/src/svc/app.py:8 imports cicd.stack",
    ]


def test_the_ast_checker_reports_a_file_it_cannot_parse(tmp_path: Path) -> None:
    _write_tree(tmp_path, {"lib/broken.py": "import os\nfrom flows import (\n"})
    found = forbidden_imports(tmp_path.rglob("*.py"), PIPELINE, tmp_path)
    assert len(found) == 1
    assert found[0].startswith("lib/broken.py:2 cannot be parsed"), found
