"""The layers of the package, checked by reading every module's imports (top-level and inside functions).

Dependencies point one way, from the front ends down to the foundation:

    cli, matrix                      front ends (thin: parse, announce, call)
    evaluation                       lm-evaluation-harness integration
    measure                          names -> proposers, arms decoded into the store, provenance
    site                             the leaderboard (reads results only)
    training                         corpora, features, objectives, recipe builds
    decoding                         engine, trees, sampling, proposers, combiners
    results                          store, migrations, metrics, summaries, bundles
    models, data                     target and drafter networks; task data, prompts, scoring
    catalog                          card schemas, YAML, the registry, proposer specs
    errors, paths                    the foundation
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "taps_bench"

# What each layer may import (besides itself); anything else is a violation.
ALLOWED: dict[str, set[str]] = {
    "foundation": set(),
    "catalog": {"foundation"},
    "data": {"foundation", "catalog"},
    "models": {"foundation", "catalog"},
    "results": {"foundation", "catalog"},
    "decoding": {"foundation", "catalog", "models"},
    "training": {"foundation", "catalog", "data", "models", "decoding"},
    "site": {"foundation", "catalog", "results"},
    "measure": {"foundation", "catalog", "data", "models", "decoding", "training", "results"},
    "evaluation": {"foundation", "catalog", "data", "models", "decoding", "results", "measure"},
    "matrix": {"foundation", "catalog", "data", "models", "decoding", "results", "measure"},
    "cli": {"foundation", "catalog", "data", "models", "decoding", "results", "measure", "training", "site",
            "evaluation", "matrix"},
}
FOUNDATION = {"errors", "paths", "__init__"}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in FOUNDATION:
        return "foundation"
    return parts[1]


def imports_of(path: Path) -> set[str]:
    """Every taps_bench module this file imports, at any depth (lazy imports inside functions count too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("taps_bench")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("taps_bench"):
            for alias in node.names:  # `from taps_bench.x import y` may name a module y
                sub = f"{node.module}.{alias.name}"
                found.add(sub if (PACKAGE.parent / Path(*sub.split("."))).with_suffix(".py").exists()
                          or (PACKAGE.parent / Path(*sub.split("."))).is_dir() else node.module)
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_layer_imports_only_the_layers_below_it() -> None:
    bad = [f"{m} ({layer(m)}) imports {i} ({layer(i)})" for m, deps in graph().items() for i in sorted(deps)
           if layer(i) != layer(m) and layer(i) not in ALLOWED[layer(m)]]
    assert not bad, "\n".join(bad)


def test_the_site_reaches_nothing_of_decoding_or_training_even_indirectly() -> None:
    g = graph()
    seen, todo = set(), [m for m in g if layer(m) == "site"]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo += [d for d in g.get(m, ()) if d in g]
    reached = sorted(m for m in seen if layer(m) in ("decoding", "training", "models", "measure"))
    assert not reached, reached


def test_no_import_cycles() -> None:
    full = graph()
    # A package's __init__ importing its own submodules (its public names) is not a cycle; leave those edges out.
    g = {m: {d for d in deps if d in full and not d.startswith(m + ".")} for m, deps in full.items()}
    state: dict[str, int] = defaultdict(int)
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(g[m]):
            if state[d] == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(d):], d]))
            if state[d] == 0:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if state[m] == 0:
            visit(m)


def test_modules_fit_on_a_few_screens() -> None:
    long = {module_name(p): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long
