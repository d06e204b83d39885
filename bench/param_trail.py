"""Follow `environment` through `promote`: the files a reader visits, and the returns.

    uv run python bench/param_trail.py [--ref GIT_REF] [--verbose] [--narrow]

Static, with `ast`, over the committed tree at `--ref` (default: the working tree):
starting at `flows/promotion.py:promote`, a name is *tracked* when it is the parameter
`environment` or is assigned from an expression that mentions a tracked name (so `env`,
`config`, `run`, `plan` ... count once they derive from it); `--narrow` tracks
only the name, its attributes and the parameters it is passed as (no value a call
computes). Every call whose arguments (or whose receiver, for a method) mention a
tracked name and whose callee is a function of the project is a *stop*; inside the
callee, the parameters bound to tracked arguments are tracked. Each function body is
expanded once (the first time it is reached); each (caller, callee) edge counts once.
Tasks called as `t(...)`, `t.fn(...)`, `t.map(...)`, `t.submit(...)` resolve to the
function. A method call on a tracked receiver resolves to the one method of that name in
the project (ambiguous names are skipped).

Printed: the stops in reading order (depth-first, source order), the files, the
*returns* (a stop in a file visited before, other than the previous stop's file) and
the *climbs* (a stop in a layer above the previous stop's: cicd > flows > tasks >
blocks > core), and the call sites, in the functions the trail reaches, that resolve a
setting again (`RESOLVERS`: configuration, registry, target, ledger store, deployer, an
environment variable).
"""

from __future__ import annotations

import argparse
import ast
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("flows", "tasks", "blocks", "core")
LAYERS = {name: rank for rank, name in enumerate(("cicd", "flows", "tasks", "blocks", "core"))}
TASK_METHODS = {"fn", "map", "submit", "with_options"}
RESOLVERS = {
    "load_config",
    "environment_registry",
    "environment_target",
    "resolve_deploy_target",
    "Ledger",  # without its store: the storage block loaded again
    "ledger_filesystem",
    "backup_filesystem",
    "release_storage",
    "release_stores",
    "deployer",
    "get",  # os.environ.get
}
"""Calls that resolve a setting (configuration, registry, target, ledger store, deployer,
an environment variable); counted in every function the trail expands."""


@dataclass
class Module:
    path: str
    tree: ast.Module
    functions: dict[str, ast.FunctionDef] = field(default_factory=dict)
    methods: dict[str, list[ast.FunctionDef]] = field(default_factory=dict)
    imports: dict[str, tuple[str, str]] = field(default_factory=dict)  # local -> (module, name)


def _source(path: str, ref: str | None) -> str:
    if ref is None:
        return (ROOT / path).read_text(encoding="utf-8")
    return subprocess.run(
        ["git", "show", f"{ref}:{path}"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout


def _files(ref: str | None) -> list[str]:
    if ref is None:
        return [str(p.relative_to(ROOT)) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    out = subprocess.run(
        ["git", "ls-tree", "-r", "--name-only", ref, *PACKAGES],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line for line in out.splitlines() if line.endswith(".py")]


def _module_name(path: str) -> str:
    name = path.removesuffix(".py").replace("/", ".")
    return name.removesuffix(".__init__")


def load(ref: str | None) -> dict[str, Module]:
    modules: dict[str, Module] = {}
    for path in _files(ref):
        tree = ast.parse(_source(path, ref))
        mod = Module(path, tree)
        for node in tree.body:
            if isinstance(node, ast.FunctionDef):
                mod.functions[node.name] = node
            elif isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, ast.FunctionDef):
                        mod.methods.setdefault(item.name, []).append(item)
            elif isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    mod.imports[alias.asname or alias.name] = (node.module, alias.name)
        modules[_module_name(path)] = mod
    return modules


def _names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _targets(node: ast.AST) -> set[str]:
    return _names(node)


class Trail:
    def __init__(self, modules: dict[str, Module], *, narrow: bool = False) -> None:
        self.modules = modules
        self.narrow = narrow
        self.stops: list[tuple[str, str]] = []
        self.expanded: set[tuple[str, str]] = set()
        self.edges: set[tuple[tuple[str, str], tuple[str, str]]] = set()
        self.resolutions: list[str] = []
        self.all_methods: dict[str, list[tuple[str, ast.FunctionDef]]] = {}
        for name, mod in modules.items():
            for meth, defs in mod.methods.items():
                for d in defs:
                    self.all_methods.setdefault(meth, []).append((name, d))

    def _derives(self, value: ast.expr, tracked: set[str]) -> bool:
        """Whether assigning `value` makes a tracked name: any mention (broad), or, narrow,
        only the value itself or an attribute of it (no value computed by a call)."""
        if not self.narrow:
            return bool(_names(value) & tracked)
        while isinstance(value, ast.Attribute):
            value = value.value
        return isinstance(value, ast.Name) and value.id in tracked

    def resolve(
        self, module: str, func: ast.expr, tracked: set[str]
    ) -> tuple[str, ast.FunctionDef] | None:
        mod = self.modules[module]
        if isinstance(func, ast.Attribute) and func.attr in TASK_METHODS:
            func = func.value
        if isinstance(func, ast.Name):
            if func.id in mod.functions:
                return module, mod.functions[func.id]
            if func.id in mod.imports:
                src, name = mod.imports[func.id]
                target = self.modules.get(src)
                if target and name in target.functions:
                    return src, target.functions[name]
            return None
        if isinstance(func, ast.Attribute) and _names(func.value) & tracked:
            found = self.all_methods.get(func.attr, [])
            local = [(m, d) for m, d in found if m == module]
            chosen = local or found
            if len(chosen) == 1:
                return chosen[0]
        return None

    def walk(self, module: str, fn: ast.FunctionDef, tracked: set[str]) -> None:
        key = (module, fn.name)
        if key in self.expanded:
            return
        self.expanded.add(key)
        for node in ast.walk(fn):
            if isinstance(node, ast.Call):
                name = node.func.attr if isinstance(node.func, ast.Attribute) else None
                name = node.func.id if isinstance(node.func, ast.Name) else name
                if name == "get" and "os.environ" not in ast.unparse(node.func):
                    continue
                if name == "Ledger" and (node.args or node.keywords):
                    continue  # given its store: nothing resolved again
                if name in RESOLVERS:
                    self.resolutions.append(f"{self.modules[module].path}:{fn.name}: {name}")
        tracked = set(tracked)
        for node in _ordered(fn):
            if (
                isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign)
                and node.value is not None
            ):
                if self._derives(node.value, tracked):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    for t in targets:
                        tracked |= _targets(t)
            elif isinstance(node, ast.withitem) and node.optional_vars is not None:
                if self._derives(node.context_expr, tracked):
                    tracked |= _targets(node.optional_vars)
            elif isinstance(node, ast.For | ast.comprehension):
                if self._derives(node.iter, tracked):
                    tracked |= _targets(node.target)
            elif isinstance(node, ast.Call):
                self.call(module, fn, node, tracked)

    def call(self, module: str, fn: ast.FunctionDef, node: ast.Call, tracked: set[str]) -> None:
        args = [*node.args, *(k.value for k in node.keywords)]
        receiver = node.func.value if isinstance(node.func, ast.Attribute) else None
        if not any(_names(a) & tracked for a in args) and not (
            receiver is not None and _names(receiver) & tracked
        ):
            return
        resolved = self.resolve(module, node.func, tracked)
        if resolved is None:
            return
        callee_mod, callee = resolved
        edge = ((module, fn.name), (callee_mod, callee.name))
        if edge in self.edges:
            return
        self.edges.add(edge)
        self.stops.append((self.modules[callee_mod].path, callee.name))
        params = [a.arg for a in (*callee.args.posonlyargs, *callee.args.args)]
        inner: set[str] = set()
        is_method = params[:1] in (["self"], ["cls"])
        if is_method:
            params = params[1:]
            if receiver is not None and _names(receiver) & tracked:
                inner.add("self")
        for param, arg in zip(params, node.args, strict=False):
            if _names(arg) & tracked:
                inner.add(param)
        for kw in node.keywords:
            if kw.arg and _names(kw.value) & tracked:
                inner.add(kw.arg)
        self.walk(callee_mod, callee, inner)


def _ordered(fn: ast.FunctionDef) -> list[ast.AST]:
    """The nodes of `fn` in source order, assignments before the calls inside them end."""
    nodes = [n for n in ast.walk(fn) if n is not fn]
    return sorted(nodes, key=lambda n: (getattr(n, "lineno", 0), getattr(n, "col_offset", 0)))


def layer(path: str) -> int:
    return LAYERS.get(path.split("/", 1)[0], len(LAYERS))


def measure(ref: str | None, *, verbose: bool, narrow: bool = False) -> dict[str, int]:
    modules = load(ref)
    trail = Trail(modules, narrow=narrow)
    start = modules["flows.promotion"].functions["promote"]
    trail.walk("flows.promotion", start, {"environment"})
    seen: list[str] = ["flows/promotion.py"]
    returns = climbs = 0
    previous = "flows/promotion.py"
    for path, name in trail.stops:
        mark = ""
        if path != previous and path in seen:
            returns += 1
            mark += " (return)"
        if layer(path) < layer(previous):
            climbs += 1
            mark += " (climb)"
        if path not in seen:
            seen.append(path)
        if verbose:
            print(f"  {path}:{name}{mark}")
        previous = path
    if verbose:
        for line in trail.resolutions:
            print(f"  resolves: {line}")
    return {
        "stops": len(trail.stops),
        "files": len(seen),
        "returns": returns,
        "climbs": climbs,
        "resolutions": len(trail.resolutions),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", default=None, help="a git ref (default: the working tree)")
    parser.add_argument("--verbose", action="store_true", help="print every stop")
    parser.add_argument(
        "--narrow", action="store_true", help="track the name and its attributes only"
    )
    options = parser.parse_args()
    where = options.ref or "working tree"
    result = measure(options.ref, verbose=options.verbose, narrow=options.narrow)
    print(
        f"{where}: environment through promote: {result['stops']} stops in "
        f"{result['files']} files, {result['returns']} returns to a file already left, "
        f"{result['climbs']} climbs up a layer; {result['resolutions']} call sites "
        "resolving a setting again in the functions reached"
    )


if __name__ == "__main__":
    main()
