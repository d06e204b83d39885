"""The suite's environments listen on loopback ports of their own.

A test environment's services listen on `local_port_offset` + their port (8001-8012). Two
test modules run at once on the two xdist workers, and the local stack outlives a suite
run: two modules whose offsets are closer than the catalogue is long bind the same ports,
and one module's deploy then fails with "address already in use", or its health check
reads the other module's service. Seen: `pf-prod` (31100) beside `rb-dev` and `lf-dev`.
This reads every offset the tests and the embedded configuration declare and refuses
two modules within reach of each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from blocks.environments import EnvironmentSpec

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
SPAN = 12
"""The ports one environment takes above its offset: the catalogue's 12 services."""
DEPLOYED = 1000
"""Offsets below this (0, 1, 2) only shape configurations that are never deployed."""


def _offsets(tree: ast.Module) -> set[int]:
    """The offsets a test module declares: `write_chain_config`'s (name, offset) pairs,
    `local_port_offset` keys and keywords, and constants named `...OFFSET`."""
    found: set[int] = set()

    def number(node: ast.AST) -> int | None:
        value = node.value if isinstance(node, ast.Constant) else None
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "write_chain_config":
            pairs = node.args[1] if len(node.args) > 1 else None
            for pair in pairs.elts if isinstance(pairs, ast.List) else ():
                if isinstance(pair, ast.Tuple) and (n := number(pair.elts[1])) is not None:
                    found.add(n)
        elif isinstance(node, ast.Call):
            found |= {
                n
                for k in node.keywords
                if k.arg == "local_port_offset" and (n := number(k.value)) is not None
            }
        elif isinstance(node, ast.Dict):
            found |= {
                n
                for k, v in zip(node.keys, node.values, strict=True)
                if getattr(k, "value", None) == "local_port_offset" and (n := number(v)) is not None
            }
        elif isinstance(node, ast.Assign) and (n := number(node.value)) is not None:
            if any(getattr(t, "id", "").endswith("OFFSET") for t in node.targets):
                found.add(n)
    return {n for n in found if n >= DEPLOYED}


def _declared() -> dict[str, set[int]]:
    declared = {
        str(path.relative_to(REPO)): _offsets(ast.parse(path.read_text()))
        for path in sorted(TESTS.rglob("*.py"))
    }
    embedded = yaml.safe_load((REPO / "config" / "pipeline.yaml").read_text())
    declared["config/pipeline.yaml"] = {e["local_port_offset"] for e in embedded["environments"]}
    return {where: offsets for where, offsets in declared.items() if offsets}


def test_the_reader_finds_the_offsets_of_every_form() -> None:
    source = (
        "OFFSET = 41100\n"
        "write_chain_config(p, [(DEV, 27100), (STG, 27600)], services=[('a', 8004)])\n"
        "EnvironmentSpec(name='x', local_port_offset=33000)\n"
        "env = {'local_port_offset': 36000, 'port': 8001}\n"
        "plan = {'local_port_offset': 1}\n"
    )
    assert _offsets(ast.parse(source)) == {41100, 27100, 27600, 33000, 36000}


def test_no_two_modules_share_ports() -> None:
    declared = _declared()
    assert len(declared) > 20, sorted(declared)  # the reader still finds the suite's modules
    bound = EnvironmentSpec.model_fields["local_port_offset"].metadata
    highest = next(int(m.le) for m in bound if hasattr(m, "le"))
    invalid = {w: sorted(o for o in offsets if o > highest) for w, offsets in declared.items()}
    assert not any(invalid.values()), f"offsets above {highest}: {invalid}"
    owners = sorted((offset, where) for where, offsets in declared.items() for offset in offsets)
    clashes = [
        f"{a_where} ({a}) and {b_where} ({b})"
        for i, (a, a_where) in enumerate(owners)
        for b, b_where in owners[i + 1 :]
        if b - a < SPAN and a_where != b_where
    ]
    assert not clashes, "offsets within 12 ports of each other: " + "; ".join(clashes)
