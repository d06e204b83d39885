"""The longest functions of the pipeline (flows, tasks, blocks, core), by lines.

    uv run python bench/longest_functions.py [GIT-REF] [--top N]

Without a ref, the working tree; with one, the tree of that commit. Lines are a
function's `def` line to its last line, decorators left out, nested functions counted
inside their parent (and listed on their own as well).
"""

from __future__ import annotations

import argparse
import ast
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("flows", "tasks", "blocks", "core")


def _sources(ref: str | None) -> dict[str, str]:
    if ref is None:
        return {
            str(p.relative_to(ROOT)): p.read_text(encoding="utf-8")
            for package in PACKAGES
            if (ROOT / package).is_dir()
            for p in sorted((ROOT / package).rglob("*.py"))
        }
    listed = subprocess.run(
        ["git", "ls-tree", "-r", "--name-only", ref, "--", *PACKAGES],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return {
        name: subprocess.run(
            ["git", "show", f"{ref}:{name}"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
        for name in listed
        if name.endswith(".py")
    }


def lengths(sources: dict[str, str]) -> list[tuple[int, str, bool]]:
    """(lines, path:line name, is a flow) per function, longest first."""
    found = []
    for path, text in sources.items():
        tree = ast.parse(text, filename=path)
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                flow = any(
                    (isinstance(d, ast.Call) and getattr(d.func, "id", "") == "flow")
                    or getattr(d, "id", "") == "flow"
                    for d in node.decorator_list
                )
                found.append((lines, f"{path}:{node.lineno} {node.name}", flow))
    return sorted(found, reverse=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ref", nargs="?")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    found = lengths(_sources(args.ref))
    for lines, where, flow in found[: args.top]:
        print(f"{lines:4d}  {where}{'  (flow)' if flow else ''}")
    flows = [f for f in found if f[2]] or [(0, "-", True)]
    print(f"functions over 60 lines: {sum(1 for f in found if f[0] > 60)}")
    print(f"longest flow function: {flows[0][0]} lines ({flows[0][1]})")
    print(
        f"flow-module functions over 50 lines: "
        f"{sum(1 for f in found if f[1].startswith('flows/') and f[0] > 50)}"
    )


if __name__ == "__main__":
    main()
