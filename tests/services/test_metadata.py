"""The services' and libs' own metadata agrees with config/pipeline.yaml (issue 8, item 6).

config/pipeline.yaml states each service's port and libs, and each lib's libs, once. What a
pyproject must still say itself (its dependencies and `[tool.uv.sources]`, the real lib
dependencies) has to agree with it, and so do the tables in services/README.md and
libs/README.md. The services' pyprojects keep only what differs per service: the tool
configuration they share lives in services/ (ruff.toml, mypy.ini, pytest.ini, bandit.yaml), and
the sections that cannot be shared (the dev group, the build system) must stay identical.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from blocks.catalog import LibSpec, ServiceSpec
from blocks.config import load_file
from tasks.quality import SHARED_CONFIGS

REPO = Path(__file__).resolve().parents[2]
CATALOG = load_file(REPO / "config" / "pipeline.yaml").catalog
LIB_NAMES = sorted(p.parent.name for p in (REPO / "libs").glob("*/pyproject.toml"))

SHARED_SECTIONS = {
    "tool.mypy": "services/mypy.ini",
    "tool.pytest": "services/pytest.ini",
    "tool.coverage": "services/pytest.ini (--cov-branch) and --cov=<package>",
    "tool.bandit": "services/bandit.yaml",
    "tool.elice": "config/pipeline.yaml (port, libs); the app is <package>.main:app",
}
"""Sections a service's pyproject must not carry, and where that setting lives instead."""


@pytest.fixture(scope="session", autouse=True)
def prefect_server() -> None:
    """Overrides the conftest's: these tests only read files, no Prefect server."""


def pyproject(path: str) -> dict[str, Any]:
    return tomllib.loads((REPO / path / "pyproject.toml").read_text(encoding="utf-8"))


def requirement_name(requirement: str) -> str:
    """The normalized distribution name of a PEP 508 requirement (`Foo_bar>=1` -> foo-bar)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, f"not a requirement: {requirement!r}"
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def declared_libs(owner: ServiceSpec | LibSpec) -> tuple[set[str], dict[str, str]]:
    """(the libs among the project's dependencies, {lib: path} of its uv path sources)."""
    data = pyproject(owner.path)
    deps = {requirement_name(r) for r in data["project"].get("dependencies", [])}
    sources = data.get("tool", {}).get("uv", {}).get("sources", {})
    return deps & set(LIB_NAMES), {name: str(src.get("path")) for name, src in sources.items()}


def lib_source_paths(owner: ServiceSpec | LibSpec) -> dict[str, str]:
    """{lib: the path source a uv project at owner.path needs for it}, for owner's libs."""
    return {lib: os.path.relpath(REPO / "libs" / lib, REPO / owner.path) for lib in owner.libs}


def readme_rows(path: str) -> dict[str, list[str]]:
    """{first cell: cells} of the markdown table rows in REPO/path (header rows excluded)."""
    rows = {}
    for line in (REPO / path).read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and not set(line) <= set("|-: "):
            rows[cells[0].strip("`")] = cells
    return rows


def test_the_catalog_lists_every_service_and_lib_directory() -> None:
    services = sorted(p.parent.name for p in (REPO / "services").glob("*/pyproject.toml"))
    assert services == sorted(CATALOG.names())
    assert LIB_NAMES == sorted(lib.name for lib in CATALOG.libs)


@pytest.mark.parametrize("service", CATALOG.services, ids=lambda s: s.name)
def test_service_lib_dependencies_match_the_catalog(service: ServiceSpec) -> None:
    project = pyproject(service.path)["project"]
    assert project["name"] == service.name, "the pipeline derives the package from the name"
    assert (REPO / service.path / "src" / service.package / "main.py").is_file()
    deps, sources = declared_libs(service)
    where = f"{service.path}/pyproject.toml vs config/pipeline.yaml"
    assert deps == set(service.libs), f"{where}: libs {sorted(deps)} != {sorted(service.libs)}"
    assert sources == lib_source_paths(service), f"{where}: [tool.uv.sources]"


@pytest.mark.parametrize("lib", CATALOG.libs, ids=lambda lib: lib.name)
def test_lib_dependencies_match_the_catalog(lib: LibSpec) -> None:
    assert pyproject(lib.path)["project"]["name"] == lib.name
    deps, sources = declared_libs(lib)
    where = f"{lib.path}/pyproject.toml vs config/pipeline.yaml"
    assert deps == set(lib.libs), f"{where}: libs {sorted(deps)} != {sorted(lib.libs)}"
    assert sources == lib_source_paths(lib), f"{where}: [tool.uv.sources]"


@pytest.mark.parametrize("service", CATALOG.services, ids=lambda s: s.name)
def test_service_pyproject_keeps_only_what_differs(service: ServiceSpec) -> None:
    data = pyproject(service.path)
    tool = data.get("tool", {})
    for section, home in SHARED_SECTIONS.items():
        name = section.removeprefix("tool.")
        assert name not in tool, f"{service.path}/pyproject.toml: [{section}] lives in {home}"
    assert set(data) == {"project", "tool", "dependency-groups", "build-system"}
    assert set(tool) == {"uv", "ruff"}
    assert set(tool["uv"]) == {"sources"}
    assert tool["ruff"] == {"extend": "../ruff.toml"}


def test_sections_every_service_must_repeat_are_identical() -> None:
    """A uv project's dev group and build system cannot come from another file: they must agree."""
    first, *others = CATALOG.services
    expected = pyproject(first.path)
    tools = {requirement_name(r) for r in expected["dependency-groups"]["dev"]}
    assert {"pytest", "pytest-cov", "ruff", "mypy", "bandit"} <= tools  # what the pipeline runs
    for service in others:
        data = pyproject(service.path)
        for key in ("dependency-groups", "build-system"):
            assert data[key] == expected[key], f"{service.path}/pyproject.toml: [{key}]"
        assert data["project"]["requires-python"] == expected["project"]["requires-python"]


def test_shared_tool_configurations_exist() -> None:
    for name in ("ruff.toml", *SHARED_CONFIGS.values()):
        assert (REPO / "services" / name).is_file(), name


def test_services_readme_agrees_with_the_catalog() -> None:
    """The README's table restates port, package and authn use: it must not drift."""
    rows = readme_rows("services/README.md")
    for service in CATALOG.services:
        assert service.name in rows, f"services/README.md: no row for {service.name}"
        _, port, package, authn, *_ = rows[service.name]
        where = f"services/README.md, {service.name} vs config/pipeline.yaml"
        assert int(port) == service.port, f"{where}: port"
        assert package == f"`{service.package}`", f"{where}: package"
        assert (authn == "yes") == ("authn" in service.libs), f"{where}: authn"


def test_libs_readme_agrees_with_the_catalog() -> None:
    rows = readme_rows("libs/README.md")
    for lib in CATALOG.libs:
        assert lib.name in rows, f"libs/README.md: no row for {lib.name}"
        named = {n.strip().strip("`") for n in rows[lib.name][2].split(",")}
        assert named & set(LIB_NAMES) == set(lib.libs), f"libs/README.md: {lib.name} depends on"


def test_requirement_names_are_normalized() -> None:
    assert requirement_name("Py_Test.Cov >= 6 ; python_version > '3'") == "py-test-cov"
    assert requirement_name("servicekit") == "servicekit"
