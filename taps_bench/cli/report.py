"""`report`: the paper's tables and claims from a matrix's stored cells, as Markdown or as a standalone HTML page."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from taps_bench.cli.app import Context, cli
from taps_bench.cli.options import db_option, db_url
from taps_bench.errors import UserError

TEMPLATES = Path(__file__).resolve().parent / "templates"
FORMATS = ("markdown", "html")


@cli.command()
@click.argument("spec_file", metavar="MATRIX")
@db_option
@click.option("--format", "fmt", default="markdown", show_default=True, help="markdown or html.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write to a file instead of stdout.")
@click.pass_obj
def report(obj: Context, spec_file: str, db: str | None, fmt: str, out: str | None) -> None:
    """The paper's tables (one per target and temperature, each cell with its 95% bootstrap interval over prompts)
    and its four claims as paired comparisons, from the stored cells of a matrix (a spec path or a shipped name)."""
    from taps_bench.paths import write_atomic
    from taps_bench.results.store import Store
    from taps_bench.results.study_text import markdown

    if fmt not in FORMATS:
        raise UserError(f"unknown --format '{fmt}': use one of {', '.join(FORMATS)}")
    with Store(db_url(db), readonly=True) as store:  # a mistyped path is refused, never created
        result = study_report(obj, spec_file, store)
    text = markdown(result) if fmt == "markdown" else html(result)
    if out is None:
        click.echo(text, nl=not text.endswith("\n"))
        return
    write_atomic(Path(out), text if text.endswith("\n") else text + "\n")
    click.echo(f"report: {len(result['tables'])} tables, {sum(len(c) for _, c in result['claims'])} claims -> {out}",
               err=True)


def study_report(obj: Context, spec_file: str, store: Any) -> dict[str, Any]:
    """The report of one matrix (a spec path or a shipped name) from an open store: what `report` prints and what
    `leaderboard build --report` publishes. Refuses (one line) a store without runs or a matrix without cells."""
    from taps_bench.matrix import spec as mx
    from taps_bench.results.study_claims import report as build

    spec = mx.check(mx.load_spec(mx.find_spec(spec_file)), obj.registry)
    if not store.runs():
        raise UserError("the database holds no runs yet: run `taps-bench matrix` first, or pass --db with the "
                        "database it wrote")
    measured, planned = stored_cells(store, spec)
    if not measured:
        raise UserError(f"matrix {spec.name} has no finished cells in this database: run `taps-bench matrix "
                        f"{spec_file}` first, or pass --db with the database it wrote")
    names = {n for p in spec.proposers for n in p.names()}
    result = build(spec.name, measured, list(spec.tasks), description=spec.description.strip(),
                   published=published(), target_labels=target_labels(obj), roles=drafter_roles(obj, names),
                   task_domains=task_domains(obj, list(spec.tasks)))
    result["coverage"] = f"{len(measured)} of {planned} cells of the matrix are stored and finished"
    return result


def stored_cells(store: Any, spec: Any) -> tuple[list[dict[str, Any]], int]:
    """The finished cells of the matrix in plan order, as `results.study_claims` takes them (each with its stored
    run and baseline run for provenance), and how many cells the matrix plans."""
    from taps_bench.matrix.spec import plan
    from taps_bench.results.summaries import of_examples

    cells = plan(spec)
    out = []
    for cell in cells:
        record = store.cell(cell.key(spec))
        if record is None or record["status"] != "done" or record["run_id"] is None:
            continue
        samples = store.samples(record["run_id"])
        base_id = record["baseline_run_id"]
        base = store.samples(base_id) if base_id is not None else []
        if cell.limit is not None:  # the runs may hold more samples, from a larger matrix: keep this cell's prompts
            ids = list(dict.fromkeys(s["example_id"] for s in samples))[:cell.limit]
            samples, base = of_examples(samples, ids), of_examples(base, ids)
        out.append({"target": cell.target, "temperature": cell.temperature, "task": cell.task,
                    "proposer": cell.entry, "samples": samples, "baseline": base,
                    "run": store.get_run(record["run_id"]),
                    "baseline_run": store.get_run(base_id) if base_id is not None else None})
    return out, len(cells)


def published() -> list[dict[str, Any]]:
    import yaml

    from taps_bench.paths import shipped_dir

    path = shipped_dir("leaderboard") / "published.yaml"
    return (yaml.safe_load(path.read_text()) or []) if path.is_file() else []


def target_labels(obj: Context) -> dict[str, str]:
    """Published targets by their model's name (`meta-llama/Meta-Llama-3-8B-Instruct` -> `Llama-3-8B-Instruct`)."""
    out = {}
    for table in published():
        name = table.get("target", "")
        try:
            hub = obj.registry.target(name).source.hub
        except UserError:
            continue
        if hub:
            out[name] = hub.rsplit("/", 1)[-1].removeprefix("Meta-")
    return out


def drafter_roles(obj: Context, names: set[str]) -> dict[str, dict[str, str]]:
    """Each registered drafter's method and training domain (math, chat, or mixed when its corpus mixes domains),
    read from its card and its corpora's cards; unregistered names are left to `study_claims.guess_role`."""
    out = {}
    for name in names:
        try:
            card = obj.registry.drafter(name)
            corpora = [part.split(":", 1)[0].strip() for part in card.corpus.split("+") if part.strip()]
            domains = {obj.registry.corpus(c).domain for c in corpora}
        except (UserError, AttributeError, KeyError, ValueError):
            continue
        out[name] = {"method": card.method, "domain": domains.pop() if len(domains) == 1 else "mixed"}
    return out


def task_domains(obj: Context, tasks: list[str]) -> dict[str, str]:
    """math for a task graded by a number or math scorer, chat for one with no scorer (MT-Bench)."""
    return {t: "chat" if obj.registry.task(t).scorer == "none" else "math" for t in tasks}


def html(result: dict[str, Any]) -> str:
    """The report as one standalone page (Jinja2, autoescaped; inline CSS, nothing fetched)."""
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    from taps_bench.results import study_text

    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["clean"] = lambda v: study_text.no_paths(str(v))
    return env.get_template("report.html").render(
        report=result, cell_text=study_text.cell_text, row_label=study_text.row_label,
        table_title=study_text.table_title, claim_rows=study_text.claim_rows, claim_headers=study_text.CLAIM_HEADERS,
        cell_legend=study_text.CELL_LEGEND, claim_legend=study_text.CLAIM_LEGEND)
