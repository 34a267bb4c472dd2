"""`taps-bench report` as text: the cells and claims of `results.study_claims` as Markdown, and the provenance lines
under each table, taken from the stored runs (never a database URL or a local path)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from taps_bench.results.study import NOT_MEASURED

CELL_LEGEND = ("Each cell: tau [95% CI] counting the prefill as a target step (taps-bench's count); EAGLE: tau as "
               "EAGLE and the paper count it (new tokens / verify steps, the prefill not a step), the convention of "
               "the published rows; acc: acceptance at draft depth 1/2/..., each given that the accepted path "
               "reached the depth above; speedup [95% CI] over the proposer's own matched autoregressive baseline; "
               "n: prompts. Intervals: 95% percentile bootstrap over prompts (an MT-Bench question pools its turns, a "
               "prompt its repeats). Oracle rows pick the best drafter per prompt after the fact (analysis only, "
               "never timed).")
CLAIM_LEGEND = ("Each claim reads \"A above B\", paired over the prompts both have: holds when the 95% interval of "
                "A - B excludes 0 above, fails when it excludes 0 below, not separated otherwise; the same for "
                "speedup, each proposer against its own baseline, so a claim can hold for tau and fail for speed.")
# An absolute path (POSIX, home-relative or Windows) inside a shown value: replaced by its last component.
_PATH = re.compile(r"(?:(?<![\w.:/~])~?/(?=[^\s/])|\b[A-Za-z]:\\)[^\s,;()]*")


def no_paths(text: str) -> str:
    """`text` with every absolute local path cut to its last component."""
    return _PATH.sub(lambda m: re.split(r"[/\\]", m.group(0).rstrip("/\\"))[-1] or "(path)", text)


def interval(ci: list[float] | None, digits: int = 2, signed: bool = False) -> str:
    if ci is None:
        return ""
    f = f"{{:+.{digits}f}}" if signed else f"{{:.{digits}f}}"
    return f" [{f.format(ci[0])}, {f.format(ci[1])}]"


def cell_text(cell: dict[str, Any] | None) -> str:
    """One table cell: `2.38 [2.30, 2.45]; EAGLE 2.45 [2.37, 2.52]; acc 0.66/0.45/0.31; 1.20x [1.16, 1.24];
    n=10`, a published one
    `EAGLE 4.09 (published)`, an absent one `-`."""
    if not cell:
        return "-"
    if "n" not in cell:  # published: the paper's number in its own (EAGLE's) count
        return f"EAGLE {cell['tau_eagle']:.2f} (published)"
    parts = [f"{cell['tau']:.2f}{interval(cell['tau_ci95'])}" if cell["tau"] is not None else "tau n/a"]
    if cell.get("tau_eagle") is not None and cell["tau_eagle"] != cell["tau"]:
        parts.append(f"EAGLE {cell['tau_eagle']:.2f}{interval(cell['tau_eagle_ci95'])}")
    if cell.get("acceptance"):
        parts.append("acc " + "/".join(f"{a:.2f}" for a in cell["acceptance"]))
    if cell.get("speedup") is not None:
        parts.append(f"{cell['speedup']:.2f}x{interval(cell['speedup_ci95'])}")
    return "; ".join([*parts, f"n={cell['n']}"])


def comparison_text(result: dict[str, Any] | None, what: str) -> str:
    """`+0.23 [+0.10, +0.35]` (difference) or `1.10 [1.04, 1.16]` (ratio) of a paired comparison, `-` if none."""
    if not result or result.get(what) is None:
        return "-"
    signed = what == "difference"
    return (f"{result[what]:+.2f}" if signed else f"{result[what]:.2f}") + interval(result[f"{what}_ci95"],
                                                                                    signed=signed)


def row_label(row: dict[str, Any]) -> str:
    return row["label"] + (" (analysis only)" if row["kind"] == "oracle" else "")


def _md(text: str) -> str:
    return no_paths(str(text)).replace("|", "\\|").replace("\n", " ")


def table_title(table: dict[str, Any]) -> str:
    return f"{table['target']}, T={table['temperature']:g}"


def claim_rows(claims: Iterable[dict[str, Any]]) -> list[list[str]]:
    """The claims table's cells: claim, statement, n, tau difference, tau ratio, tau verdict, speedup difference,
    speedup ratio, speedup verdict."""
    out = []
    for c in claims:
        statement = c["statement"] + (f" (not measured: {c['note']})" if c["tau_verdict"] == NOT_MEASURED and
                                      c.get("note") else "")
        n = (c["tau"] or {}).get("n")
        out.append([c["claim"], statement, "-" if n is None else str(n), comparison_text(c["tau"], "difference"),
                    comparison_text(c["tau"], "ratio"), c["tau_verdict"], comparison_text(c["speedup"], "difference"),
                    comparison_text(c["speedup"], "ratio"), c["speedup_verdict"]])
    return out


CLAIM_HEADERS = ["claim", "A above B", "n", "tau A - B [95% CI]", "tau A / B", "tau", "speedup A - B [95% CI]",
                 "speedup A / B", "speed"]


def _md_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(_md(h) for h in headers) + " |", "|" + "---|" * len(headers),
            *("| " + " | ".join(_md(c) for c in row) + " |" for row in rows)]


def provenance_lines(runs: Iterable[dict[str, Any]]) -> list[str]:
    """What the stored runs of a table were measured with: target, machine, dtype, threads, commit, versions and
    the settings that shape the numbers, each value once (a run resumed in later sessions brings theirs)."""
    seen: dict[str, dict[str, None]] = {k: {} for k in ("target", "machine", "dtype", "threads", "commit",
                                                        "versions", "settings")}
    for run in runs:
        prov = run.get("provenance") if isinstance(run.get("provenance"), dict) else {}
        settings = run.get("settings") if isinstance(run.get("settings"), dict) else {}
        seen["target"][str(run.get("target"))] = None
        for p in [prov, *[s for s in prov.get("later_sessions") or [] if isinstance(s, dict)]]:
            seen["machine"][f"{p.get('device_name', '?')} ({p.get('device', '?')})"] = None
            seen["dtype"][str(p.get("dtype", "?"))] = None
            seen["threads"][str(p.get("threads", "?"))] = None
            seen["commit"][str(p.get("git_commit") or "unknown")[:12] + ("+dirty" if "dirty" in
                                                                        str(p.get("git_commit")) else "")] = None
            versions = p.get("versions") if isinstance(p.get("versions"), dict) else {}
            seen["versions"][", ".join(f"{k} {v}" for k, v in versions.items() if k in ("taps-bench", "torch",
                                       "transformers", "python") and v)] = None
        if run.get("kind") == "baseline":  # its settings are the speculative run's, less the tree
            continue
        tree = settings.get("tree") if isinstance(settings.get("tree"), dict) else {}
        shape = f"tree {tree.get('total_tokens')}/{tree.get('depth')}/{tree.get('top_k')}, " if tree else ""
        seen["settings"][f"{shape}max {settings.get('max_new_tokens')} new tokens"] = None
    return [no_paths(f"{k}: {'; '.join(v)}") for k, v in seen.items() if v]


def markdown(report: dict[str, Any]) -> str:
    """The whole report as Markdown: per table its cells, legend and provenance; then the claims per table."""
    lines = [f"# taps-bench report: {_md(report['matrix'])}", ""]
    if report.get("description"):
        lines += [_md(report["description"]), ""]
    if report.get("coverage"):
        lines += [_md(report["coverage"]), ""]
    for table in report["tables"]:
        lines += [f"## {_md(table_title(table))}", ""]
        rows = [[("_" + row_label(r) + "_") if r["kind"] == "published" else row_label(r),
                 *(cell_text(r["cells"].get(t)) for t in table["tasks"])] for r in table["rows"]]
        lines += _md_table(["proposer", *table["tasks"]], rows)
        lines += ["", CELL_LEGEND, ""]
        lines += [f"- {_md(line)}" for line in table.get("provenance", [])] + [""]
    for title, claims in report["claims"]:
        lines += [f"## Claims: {_md(title)}", ""]
        lines += _md_table(CLAIM_HEADERS, claim_rows(claims))
        lines += [""]
    if report["claims"]:
        lines += [CLAIM_LEGEND, ""]
    return "\n".join(lines)
