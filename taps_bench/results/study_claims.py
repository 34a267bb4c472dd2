"""The paper's tables and its four claims, assembled from a matrix's measured cells (`taps-bench report`).

Input is plain data: one dict per measured cell, `{"target", "temperature", "task", "proposer", "samples",
"baseline"}` (`proposer` a `ProposerSpec` or its flat dict, `baseline` the samples of its matched autoregressive run,
possibly empty). Cells of one proposer on one task (the repeats of a sampled cell) pool into one row cell. A row is
identified by its proposer spec alone: a single drafter by name; a combiner by its name, drafters and options.

Rows come in the paper's order: single drafters, averaged, confidence routed, entropy routed, merged trees (other
combiners after them), and the oracle (`results.oracle`: per prompt the best of the drafters a combiner routes
among, analysis only, never timed). The claims (`claims`), each on tau and on speedup (`study.compare`):

- specialisation: per drafter method, the math drafter above the chat drafter on math tasks, the chat drafter above
  the math one on chat tasks;
- averaging: each parent above the weight average of the two, and confidence routing above it;
- routing: confidence routing above the best of its own single drafters on each task, and above entropy routing
  (of the same drafters, at the same granularity when the matrix has it);
- merged trees: a merged tree (budget full, and equal) above confidence routing of the same drafters.

A claim whose rows the matrix lacks is one "not measured" line saying which row is missing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from taps_bench.catalog.proposers import ProposerSpec
from taps_bench.results.metrics import summarize
from taps_bench.results.oracle import oracle_samples
from taps_bench.results.study import NOT_MEASURED, cell_estimate, compare, pool_repeats
from taps_bench.results.study_text import provenance_lines

Sample = dict[str, Any]
Rows = dict[ProposerSpec, dict[str, tuple[list[Sample], list[Sample]]]]  # proposer -> task -> (samples, baseline)

GROUPS = ("single drafters", "averaged", "confidence routed", "entropy routed", "merged trees", "other combiners",
          "oracle")
_GROUP_OF = {"average": "averaged", "confidence": "confidence routed", "entropy": "entropy routed",
             "merged-tree": "merged trees"}
CLAIMS = ("specialisation", "averaging", "routing", "merged trees")


def spec_of(proposer: ProposerSpec | dict[str, Any]) -> ProposerSpec:
    return proposer if isinstance(proposer, ProposerSpec) else ProposerSpec.model_validate(proposer)


def short_name(name: str) -> str:
    """A drafter name as a report shows it: a checkpoint directory by its last component only (a report never
    shows a local path)."""
    return name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] if "/" in name or "\\" in name else name


def label(proposer: ProposerSpec) -> str:
    """`name`, or `combiner(a, b; option=value)` with drafter names shortened."""
    if proposer.drafter:
        return short_name(proposer.drafter)
    options = "".join(f"; {k}={v:g}" if isinstance(v, float) else f"; {k}={v}" for k, v in proposer.options)
    return f"{proposer.combiner}({', '.join(short_name(d) for d in proposer.drafters)}{options})"


def group(proposer: ProposerSpec) -> str:
    return "single drafters" if proposer.drafter else _GROUP_OF.get(proposer.combiner or "", "other combiners")


def option(proposer: ProposerSpec, key: str) -> Any:
    return dict(proposer.options).get(key)


def collect(measured: Iterable[dict[str, Any]]) -> dict[tuple[str, float], Rows]:
    """The measured cells grouped by (target, temperature), then proposer and task, repeats pooled."""
    cells: dict[tuple[str, float], dict[ProposerSpec, dict[str, list]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list)))
    for m in measured:
        cells[(m["target"], float(m["temperature"]))][spec_of(m["proposer"])][m["task"]].append(
            (list(m["samples"]), list(m.get("baseline") or [])))
    return {board: {p: {t: pool_repeats(arms) for t, arms in tasks.items()} for p, tasks in rows.items()}
            for board, rows in cells.items()}


def _oracles(rows: Rows) -> list[tuple[str, dict[str, list[Sample]]]]:
    """One oracle per distinct drafter set a combiner routes among (all single drafters when no combiner is
    measured), over the single drafters of that set the matrix has: label and per-task samples."""
    singles = {p.drafter: tasks for p, tasks in rows.items() if p.drafter}
    sets = list(dict.fromkeys(p.drafters for p in rows if p.combiner)) or [tuple(singles)]
    out = []
    for names in sets:
        members = [n for n in names if n in singles]
        if len(members) < 2:
            continue
        tasks = set.intersection(*(set(singles[n]) for n in members))
        per_task = {t: oracle_samples({n: singles[n][t][0] for n in members})[0] for t in sorted(tasks)}
        out.append((f"oracle({', '.join(short_name(n) for n in members)})", per_task))
    return out


def _published_group(row: dict[str, Any]) -> str:
    name = str(row.get("name", "")).lower()
    for word, where in (("averag", "averaged"), ("confidence", "confidence routed"), ("entropy", "entropy routed"),
                        ("merged", "merged trees")):
        if word in name:
            return where
    return "single drafters"


def published_rows(published: list[dict[str, Any]], temperature: float,
                   target_labels: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The published tables (`leaderboard/published.yaml`'s entries) of this temperature as report rows: label
    `published (arXiv ..., <target>)`, the paper's numbers per task in `cells` as `{"tau_eagle": value}` (the paper
    counts tau as EAGLE does), and the row's group and drafter (where it is one drafter) to place it by."""
    out = []
    for table in published:
        if float(table.get("temperature", -1)) != float(temperature) or table.get("metric") != "tau":
            continue
        source = str(table.get("source", "published")).split(",")[0].strip()
        target = (target_labels or {}).get(table.get("target", ""), table.get("target", ""))
        for r in table.get("rows") or []:
            cells = {k: {"tau_eagle": float(v)} for k, v in r.items() if k not in ("name", "drafter", "family")}
            out.append({"label": f"{r.get('name')}: published ({source}, {target})", "kind": "published",
                        "group": _published_group(r), "drafter": r.get("drafter"), "cells": cells})
    return out


def _placed(measured: list[dict[str, Any]], published: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Measured rows in the paper's order, each published row after the measured row of its drafter, else after
    the last measured row of its group, else where its group would be."""
    # (group, position, published rows beside their own drafter's row before the others there, published order)
    keyed = [((GROUPS.index(r["group"]), float(i), 0, 0), r) for i, r in enumerate(measured)]
    for j, p in enumerate(published):
        own = [i for i, r in enumerate(measured) if p["drafter"] and r.get("drafter") == p["drafter"]]
        where = measured[own[-1]]["group"] if own else p["group"]  # its own drafter's row, whatever its group
        near = own or [i for i, r in enumerate(measured) if r["group"] == where]
        keyed.append(((GROUPS.index(where), (near[-1] if near else len(measured)) + 0.5, 0 if own else 1, j), p))
    return [r for _, r in sorted(keyed, key=lambda kr: kr[0])]


def tables(measured: Iterable[dict[str, Any]], tasks: list[str], published: list[dict[str, Any]] | None = None,
           target_labels: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """One table per (target, temperature): `{"target", "temperature", "tasks", "rows"}`, each row `{"label",
    "kind" (measured | oracle | published), "group", "drafter", "cells": {task: cell}}`, a measured or oracle cell
    being `study.cell_estimate` (the oracle's without speedup), a published one `{"tau_eagle": value}`."""
    out = []
    for (target, temperature), rows in sorted(collect(measured).items()):
        ordered = sorted(rows, key=lambda p: GROUPS.index(group(p)))  # stable: spec order within a group
        measured_rows = [{"label": label(p), "kind": "measured", "group": group(p), "drafter": p.drafter,
                          "cells": {t: cell_estimate(*rows[p][t]) for t in tasks if t in rows[p]}} for p in ordered]
        measured_rows += [{"label": name, "kind": "oracle", "group": "oracle", "drafter": None,
                           "cells": {t: cell_estimate(ss) for t, ss in per_task.items() if t in tasks}}
                          for name, per_task in _oracles(rows)]
        pub = published_rows(published or [], temperature, target_labels)
        out.append({"target": target, "temperature": temperature, "tasks": list(tasks),
                    "rows": _placed(measured_rows, pub)})
    return out


# -- the claims ---------------------------------------------------------------------------------------------------


def guess_role(name: str) -> dict[str, str]:
    """A drafter's method and training domain guessed from its name (for checkpoint directories that have no
    card): `math` / `chat` when the name says so, method from the usual family names, else empty."""
    n = short_name(name).lower()
    domain = "math" if "math" in n else "chat" if ("chat" in n or "sharegpt" in n) else ""
    method = next((m for m in ("eagle3", "eagle2", "hass", "eagle") if m in n.replace("-", "")), "")
    return {"method": method, "domain": domain}


def _claim(claim: str, statement: str, board: tuple[str, float], task: str | None,
           a: tuple[ProposerSpec, dict[str, Any]] | None = None,
           b: tuple[ProposerSpec, dict[str, Any]] | None = None, note: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {"claim": claim, "statement": statement, "target": board[0], "temperature": board[1],
                           "task": task, "a": label(a[0]) if a else None, "b": label(b[0]) if b else None,
                           "tau": None, "tau_verdict": NOT_MEASURED, "speedup": None, "speedup_verdict": NOT_MEASURED,
                           "note": note}
    if a is not None and b is not None and task is not None:
        (sa, ba), (sb, bb) = a[1][task], b[1][task]
        out |= compare(sa, sb, ba, bb)
    return out


def _above(claim: str, board: tuple[str, float], rows: Rows, a: ProposerSpec, b: ProposerSpec,
           who: str | None = None) -> list[dict[str, Any]]:
    """"A above B on <task>" on every task both rows measured (`who` names A, else its label)."""
    return [_claim(claim, f"{who or label(a)} above {label(b)} on {t}", board, t, (a, rows[a]), (b, rows[b]))
            for t in rows[a] if t in rows[b]]


def _same_set(p: ProposerSpec, q: ProposerSpec) -> bool:
    return set(p.drafters) == set(q.drafters)


def claims(measured: Iterable[dict[str, Any]], roles: dict[str, dict[str, str]] | None = None,
           task_domains: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The four claims on every (target, temperature) of the measured cells, one dict per comparison and task:
    claim, statement ("A above B on task"), target, temperature, task, a, b (row labels), tau and speedup
    (`study.paired_tau` / `paired_speedup`), tau_verdict and speedup_verdict (holds | fails | not separated | not
    measured), note. `roles`: drafter name -> {"method", "domain" (math | chat | mixed | ...)} (names not in it are
    guessed from the name, `guess_role`); `task_domains`: task -> math | chat (default: mt-bench chat, others
    math)."""
    out = []
    for board, rows in sorted(collect(measured).items()):
        for make in (_specialisation, _averaging, _routing, _merged):
            out += make(board, rows, roles or {}, task_domains or {})
    return out


def _domain(task: str, task_domains: dict[str, str]) -> str:
    return task_domains.get(task) or ("chat" if task == "mt-bench" else "math")


def _specialisation(board: tuple[str, float], rows: Rows, roles: dict[str, dict[str, str]],
                    task_domains: dict[str, str]) -> list[dict[str, Any]]:
    by_method: dict[str, dict[str, list[ProposerSpec]]] = defaultdict(lambda: defaultdict(list))
    for p in rows:
        if p.drafter:
            role = roles.get(p.drafter) or guess_role(p.drafter)
            by_method[role.get("method", "")][role.get("domain", "")].append(p)
    out = []
    for method, domains in by_method.items():
        # With more than one math or chat drafter of a method, a statement names its pair (else they read alike).
        several = len(domains.get("math", [])) > 1 or len(domains.get("chat", [])) > 1
        for math in domains.get("math", []):
            for chat in domains.get("chat", []):
                for task in (t for t in rows[math] if t in rows[chat]):
                    if (domain := _domain(task, task_domains)) not in ("math", "chat"):
                        continue  # a task of neither kind: the paper claims nothing about it
                    better, worse = (math, chat) if domain == "math" else (chat, math)
                    what = "math drafter above chat drafter" if better is math else "chat drafter above math drafter"
                    if several:
                        what += f" ({label(better)} above {label(worse)})"
                    what += f" on {task}"
                    out.append(_claim("specialisation", f"{method}: {what}" if method else what, board, task,
                                      (better, rows[better]), (worse, rows[worse])))
    return out or [_claim("specialisation", "math drafter above chat drafter on math tasks, chat above math on chat "
                          "tasks", board, None, note="no math and chat drafter of one method in this matrix")]


def _averaging(board: tuple[str, float], rows: Rows, roles: dict[str, dict[str, str]],
               task_domains: dict[str, str]) -> list[dict[str, Any]]:
    averaged = [p for p in rows if p.combiner == "average"]
    if not averaged:
        return [_claim("averaging", "each parent, and confidence routing, above the weight average", board, None,
                       note="no `combiner: average` row in this matrix")]
    out = []
    for avg in averaged:
        parents = [p for p in rows if p.drafter in avg.drafters]
        routed = [p for p in rows if p.combiner == "confidence" and _same_set(p, avg)]
        for better, who in [(p, f"parent {label(p)}") for p in parents] + [(r, label(r)) for r in routed]:
            out += _above("averaging", board, rows, better, avg, who)
        if not parents:
            out.append(_claim("averaging", f"each parent above {label(avg)}", board, None,
                              note="its parents' single-drafter rows are not in this matrix"))
        if not routed:
            out.append(_claim("averaging", f"confidence routing above {label(avg)}", board, None,
                              note="no confidence routing over the same drafters in this matrix"))
    return out


def _routing(board: tuple[str, float], rows: Rows, roles: dict[str, dict[str, str]],
             task_domains: dict[str, str]) -> list[dict[str, Any]]:
    routed = [p for p in rows if p.combiner == "confidence"]
    if not routed:
        return [_claim("routing", "confidence routing above the best single drafter and above entropy routing",
                       board, None, note="no `combiner: confidence` row in this matrix")]
    out = []
    for conf in routed:
        singles = [p for p in rows if p.drafter in conf.drafters]
        for task in rows[conf]:
            have = [p for p in singles if task in rows[p]]
            if not have:
                out.append(_claim("routing", f"{label(conf)} above the best single drafter on {task}", board, None,
                                  note="its single drafters are not measured on this task"))
                continue
            best = max(have, key=lambda p: summarize(rows[p][task][0])["tau"] or 0.0)  # the best point estimate
            out.append(_claim("routing", f"{label(conf)} above the best single drafter ({label(best)}) on {task}",
                              board, task, (conf, rows[conf]), (best, rows[best])))
        entropy = [p for p in rows if p.combiner == "entropy" and _same_set(p, conf)]
        alike = [p for p in entropy if option(p, "granularity") == option(conf, "granularity")]
        for ent in alike or entropy:
            out += _above("routing", board, rows, conf, ent)
        if not entropy:
            out.append(_claim("routing", f"{label(conf)} above entropy routing", board, None,
                              note="no entropy routing over the same drafters in this matrix"))
    return out


def _merged(board: tuple[str, float], rows: Rows, roles: dict[str, dict[str, str]],
            task_domains: dict[str, str]) -> list[dict[str, Any]]:
    merged = [p for p in rows if p.combiner == "merged-tree"]
    out = []
    for budget in ("full", "equal"):
        these = [p for p in merged if option(p, "budget") == budget]
        if not these:
            out.append(_claim("merged trees", f"merged trees (budget {budget}) above confidence routing", board,
                              None, note=f"no `combiner: merged-tree` row with budget {budget} in this matrix"))
        for tree in these:
            routed = [p for p in rows if p.combiner == "confidence" and _same_set(p, tree)]
            for conf in routed:
                out += _above("merged trees", board, rows, tree, conf)
            if not routed:
                out.append(_claim("merged trees", f"{label(tree)} above confidence routing", board, None,
                                  note="no confidence routing over the same drafters in this matrix"))
    return out


# -- the whole report ---------------------------------------------------------------------------------------------


def report(matrix: str, measured: Iterable[dict[str, Any]], tasks: list[str], description: str = "",
           published: list[dict[str, Any]] | None = None, target_labels: dict[str, str] | None = None,
           roles: dict[str, dict[str, str]] | None = None,
           task_domains: dict[str, str] | None = None) -> dict[str, Any]:
    """Everything `taps-bench report` shows, as plain data: `{"matrix", "description", "tables", "claims"}`, the
    tables of `tables` each with its `provenance` lines (from the measured cells' stored `run` and `baseline_run`
    dicts, when given), and the claims of `claims` as (table title, claims) per target and temperature."""
    measured = list(measured)
    out = tables(measured, tasks, published, target_labels)
    for table in out:
        board = (table["target"], table["temperature"])
        runs = [r for m in measured if (m["target"], float(m["temperature"])) == board
                for r in (m.get("run"), m.get("baseline_run")) if r]
        table["provenance"] = provenance_lines(runs)
    by_board: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for c in claims(measured, roles, task_domains):
        by_board[(c["target"], c["temperature"])].append(c)
    titled = [(f"{target}, T={temperature:g}", cs) for (target, temperature), cs in sorted(by_board.items())]
    return {"matrix": matrix, "description": description, "tables": out, "claims": titled}
