"""The import order of llmqgen's packages (ARCHITECTURE.md, "Layers"): every import, at module level or
inside a function, goes from a higher layer to a lower one, so that there are no cycles between packages.

Layers, lowest first (a package imports its own modules and those of lower layers, never a package of
its own layer or above):
  0  llmqgen/__init__.py (the version)
  1  models, hardware, layout, data, cliargs: what a model and the GPUs are, where values sit in the memory
     table's rows (layout.py, a leaf), token data on disk (data: tokenizing, shards, loader; it knows no
     model, plan or GPU), the command line's argument parsing (cliargs)
  2  metrics: FLOPs, SOL, MFU of a model on a GPU
  3  plan: the plan, its memory table, lifetimes, cost model and solver
  4  codegen, checkpoint: the program of a plan; training state and HF checkpoints of a plan (beside
     codegen: neither needs the other)
  5  compile: NVRTC and the build folders
  6  runtime: the GPU side, driving all of the above
  7  the command line: cli.py, cachecmd.py and __main__.py, one unit (checkpoint/cli.py and data/cli.py are
     their packages' click groups, which cli.py mounts)
Imports under `if TYPE_CHECKING:` never run and are not counted.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import llmqgen

ROOT = Path(llmqgen.__file__).resolve().parent
LAYERS = [{"llmqgen"}, {"models", "hardware", "layout", "data", "cliargs"}, {"metrics"}, {"plan"}, {"codegen", "checkpoint"},
          {"compile"}, {"runtime"}, {"cli"}]
COMMAND_LINE = {"cli", "cachecmd", "__main__"}
RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}
# Known exceptions (importer, imported): the only ones allowed, each with the reason it is not yet fixed.
KNOWN: dict[tuple[str, str], str] = {}


def module_name(path: Path) -> str:
    parts = ("llmqgen",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit(module: str) -> str:
    """The layered unit of a module: its top-level package or module under llmqgen ("plan", "metrics"),
    "cli" for the command line's modules."""
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "llmqgen"
    return "cli" if top in COMMAND_LINE else top


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports(path: Path) -> set[str]:
    """Every llmqgen module `path` imports, anywhere in its body (relative imports resolved; `from pkg
    import name` counts pkg.name when that is a module, else pkg)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    out: set[str] = set()
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "llmqgen"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "llmqgen":
                continue
            for a in node.names:
                sub = f"{mod}.{a.name}"
                out.add(sub if _is_module(sub) else mod)
    return out


def _is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (ROOT / rel).with_suffix(".py").is_file() or (ROOT / rel / "__init__.py").is_file()


def edges() -> set[tuple[str, str]]:
    return {(module_name(p), dep) for p in ROOT.rglob("*.py") for dep in imports(p)}


def test_every_import_goes_down_the_layers():
    all_edges = edges()
    units = {unit(a) for a, _ in all_edges} | {unit(b) for _, b in all_edges}
    assert units <= set(RANK), f"place these in LAYERS (and ARCHITECTURE.md): {sorted(units - set(RANK))}"
    bad = sorted(f"{a} -> {b}" for a, b in all_edges
                 if unit(a) != unit(b) and RANK[unit(b)] >= RANK[unit(a)] and (a, b) not in KNOWN)
    assert not bad, "imports against the layer order (lower layers must not import higher ones):\n  " + "\n  ".join(bad)


def test_known_exceptions_still_exist():
    """An exception that was fixed leaves the list, so that it cannot come back unnoticed."""
    stale = sorted(set(KNOWN) - edges())
    assert not stale, f"no longer imported, remove from KNOWN: {stale}"


def test_no_cycles_between_packages():
    graph: dict[str, set[str]] = {}
    for a, b in edges():
        if unit(a) != unit(b) and (a, b) not in KNOWN:
            graph.setdefault(unit(a), set()).add(unit(b))
    done: set[str] = set()

    def visit(u: str, path: list[str]) -> None:
        for v in sorted(graph.get(u, ())):
            if v in path:
                pytest.fail("package cycle: " + " -> ".join(path[path.index(v):] + [v]))
            if v not in done:
                visit(v, path + [v])
        done.add(u)

    for u in sorted(graph):
        if u not in done:
            visit(u, [u])


def test_the_scanner_sees_lazy_and_relative_imports_but_not_type_checking_ones():
    """cli.py imports inside its commands, runtime/rank.py relatively (`from . import driver` is a module);
    metrics.py imports plan.schema only for type checking."""
    assert {"llmqgen.plan.solver", "llmqgen.runtime.run"} <= imports(ROOT / "cli.py")
    assert {"llmqgen.layout", "llmqgen.compile.build_folder", "llmqgen.runtime.driver"} <= imports(ROOT / "runtime" / "rank.py")
    assert imports(ROOT / "metrics.py") == {"llmqgen.hardware.spec", "llmqgen.models.spec"}
