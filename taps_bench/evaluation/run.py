"""`taps-bench lm-eval`: both arms through lm-eval, results JSON with acceptance statistics, the store."""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from taps_bench.catalog.cards import TreeOverride
from taps_bench.catalog.proposers import ProposerSpec
from taps_bench.catalog.registry import Registry
from taps_bench.data.tasks import data_file_hash
from taps_bench.decoding.sampling import Sampling
from taps_bench.errors import UserError
from taps_bench.evaluation.model import MODEL_NAME, TapsLM
from taps_bench.evaluation.tasks import (
    LocalTask,
    go_offline,
    read_task_config,
    taps_scoring,
    task_manager,
    write_local_tasks,
)
from taps_bench.models.targets import Target
from taps_bench.results.samples import COUNTER_FIELDS
from taps_bench.results.summaries import speedup_text, summarize_pair

log = logging.getLogger(__name__)

# What a stored lm-eval sample takes from the model's generation record as it is.
SAMPLE_FIELDS = ("prompt_hash", "prompt_tokens", "output_ids", "output_text", *COUNTER_FIELDS)


# -- `taps-bench lm-eval` --------------------------------------------------------------------------------------


@dataclass
class LmEvalOptions:
    """`taps-bench lm-eval`'s options: the proposer (None: the plain target only) and how lm-eval runs."""

    tasks: tuple[str, ...]
    target: str | None = None
    proposer: ProposerSpec | None = None
    tree: TreeOverride = field(default_factory=TreeOverride)
    baseline: bool = False
    limit: int | None = None
    num_fewshot: int | None = None
    max_gen_toks: int = 256
    apply_chat_template: bool = False
    system_instruction: str | None = None
    output: Path | None = None
    db: str | None = None
    data_dir: str | None = None
    device: str | None = None
    dtype: str | None = None
    seed: int = 0
    allow_pickle: bool = False
    build: bool = True
    show_progress: bool = True


@dataclass
class ArmResult:
    """One lm-eval evaluation (the speculative arm or the plain target) and where it was written."""

    label: str
    kind: str  # "speculative" | "baseline"
    results: dict[str, Any]
    samples: dict[str, list[dict[str, Any]]]
    records: list[dict[str, Any]]
    results_file: Path | None = None
    run_ids: dict[str, int] = field(default_factory=dict)
    taps_scores: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)

    def outputs(self, task: str) -> dict[tuple[int, int], list[int]]:
        return {(int(r["doc_id"]), int(r["repeat"])): r["output_ids"] for r in self.records if r["task"] == task}


def _metric_items(task_results: dict[str, Any]) -> list[tuple[str, str, float]]:
    """(metric, filter, value) for every metric lm-eval reported for a task, stderr excluded."""
    items = []
    for key, value in task_results.items():
        if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
            continue
        metric, filt = key.split(",", 1)
        items.append((metric, filt, float(value)))
    return items


def primary_metric(samples: list[dict[str, Any]]) -> tuple[str, str] | None:
    """(metric, filter) that is stored as a sample's `correct`: exact_match under the task's first filter (for
    gsm8k strict-match, the format the few-shot examples teach; for minerva_math500 its only filter)."""
    for s in samples:
        if "exact_match" in s.get("metrics", []):
            return "exact_match", str(s["filter"])
    return None


def _per_doc(samples: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """lm-eval's logged samples (one per doc and filter) grouped by doc: metrics and filtered answers per filter."""
    docs: dict[int, dict[str, Any]] = {}
    for s in samples:
        d = docs.setdefault(int(s["doc_id"]), {"target": s.get("target"), "metrics": {}, "filtered": {},
                                               "doc_hash": s.get("doc_hash"), "prompt_hash": s.get("prompt_hash")})
        for m in s.get("metrics", []):
            d["metrics"][f"{m},{s['filter']}"] = s.get(m)
        d["filtered"][str(s["filter"])] = s.get("filtered_resps")
    return docs


def _first_text(value: Any) -> str | None:
    while isinstance(value, list) and value:
        value = value[0]
    return None if value is None or isinstance(value, list) else str(value)


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _run_settings(target: Target, task: LocalTask, opts: LmEvalOptions, results: dict[str, Any],
                  proposer_settings: dict[str, Any]) -> dict[str, Any]:
    """What identifies the run in the store (`runner.run_settings`): the prompts are lm-eval's task configuration,
    which both arms of one lm-eval setting share (so they pair up as a run and its baseline)."""
    from taps_bench.measure.runner import Arm, run_settings

    lm_eval_settings = {
        "task": task.name, "version": metadata.version("lm_eval"),
        "task_version": results.get("versions", {}).get(task.name),
        "num_fewshot": results.get("n-shot", {}).get(task.name, opts.num_fewshot),
        "apply_chat_template": opts.apply_chat_template, "fewshot_as_multiturn": opts.apply_chat_template,
        "system_instruction": opts.system_instruction, "stock_yaml_sha256": _sha(read_task_config(task.stock_yaml)),
        "dataset": task.dataset_path,
    }
    arm = Arm(kind="speculative" if proposer_settings else "baseline", proposer="", sampling=Sampling(seed=opts.seed),
              max_new_tokens=opts.max_gen_toks, settings=proposer_settings)
    return run_settings(target, _sha(lm_eval_settings), data_file_hash(task.data_file), arm,
                        extra={"lm_eval": lm_eval_settings})


def store_task(store: Any, lm: TapsLM, arm: ArmResult, task: LocalTask, opts: LmEvalOptions,
               provenance: dict[str, Any], reference: dict[tuple[int, int], list[int]] | None) -> int:
    """One run per (arm, task) with one sample per generation request: the engine's counters, lm-eval's metrics
    for the document, and whether the output equals the plain target's (`reference`, at temperature 0)."""
    settings = _run_settings(lm.target, task, opts, arm.results, lm.settings)
    run_id = store.get_or_create_run(arm.kind, lm.target.name, f"lm-eval:{task.name}", lm.label, 0.0, settings,
                                     provenance)
    docs = _per_doc(arm.samples.get(task.name, []))
    primary = primary_metric(arm.samples.get(task.name, []))
    taps = arm.taps_scores.get(task.name, {})
    for r in arm.records:
        if r["task"] != task.name:
            continue
        doc = docs.get(int(r["doc_id"]), {})
        metrics = doc.get("metrics", {})
        correct = metrics.get(f"{primary[0]},{primary[1]}") if primary else None
        ref = reference.get((int(r["doc_id"]), int(r["repeat"]))) if reference is not None else None
        lm_eval = {"metrics": metrics, "filtered_resps": doc.get("filtered", {}),
                   "primary_metric": ",".join(primary) if primary else None, "doc_hash": doc.get("doc_hash"),
                   "temperature": r["temperature"]}
        sample = {k: r[k] for k in SAMPLE_FIELDS} | {
            # one stored sample per document and repeat (the record's example_id names the task as well)
            "example_id": str(r["doc_id"]), "turn": int(r["repeat"]),
            "extracted": _first_text(doc.get("filtered", {}).get(primary[1])) if primary else None,
            "gold": None if doc.get("target") is None else str(doc["target"]),
            "correct": None if correct is None else bool(correct),
            "lossless": (r["output_ids"] == ref) if ref is not None and r["temperature"] == 0 else None,
            "extra": json.loads(json.dumps({"lm_eval": lm_eval, "taps_bench_scorer": taps.get(int(r["doc_id"])),
                                            **r["extra"]}, default=str)),
        }
        store.add_sample(run_id, sample)
    return run_id


def _stored_reference(store: Any, lm: TapsLM, task: LocalTask, opts: LmEvalOptions,
                      results: dict[str, Any]) -> dict[tuple[int, int], list[int]] | None:
    """Outputs of a plain-target run with the same settings stored earlier, for the lossless check."""
    settings = _run_settings(lm.target, task, opts, results, lm.settings)
    base = store.baseline_for({"target": lm.target.name, "task": f"lm-eval:{task.name}", "temperature": 0.0,
                               "settings": json.loads(json.dumps(settings, default=str))})
    if base is None:
        return None
    return {(int(s["example_id"]), int(s["turn"])): s["output_ids"] for s in store.samples(base["id"])}


def evaluate_arm(lm: TapsLM, kind: str, tasks: dict[str, LocalTask], manager: Any, opts: LmEvalOptions,
                 reg: Registry, data_dir: Path) -> ArmResult:
    """Run lm-eval's evaluation of `tasks` with `lm`, write its results JSON and samples (with the acceptance
    statistics in them), and score the outputs with taps-bench's scorer too."""
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.utils import sanitize_model_name

    proposer = {k: "+".join(v) if k == "drafters" else v for k, v in opts.proposer.flat().items()} \
        if opts.proposer and not lm.baseline else {}
    model_args = {"target": lm.target.name, **({"baseline": True} if lm.baseline else {}), **proposer,
                  "max_gen_toks": opts.max_gen_toks, "seed": opts.seed}
    tracker = EvaluationTracker(output_path=str(opts.output)) if opts.output else None
    results = simple_evaluate(model=lm, model_args=model_args, tasks=list(tasks), num_fewshot=opts.num_fewshot,
                              limit=opts.limit, log_samples=True, evaluation_tracker=tracker,
                              system_instruction=opts.system_instruction,
                              apply_chat_template=opts.apply_chat_template,
                              fewshot_as_multiturn=opts.apply_chat_template, task_manager=manager)
    if results is None:  # only a non-zero rank gets None; taps is a single-process model
        raise UserError("lm-eval returned no results")
    samples = results.pop("samples", {})
    # lm-eval names a model object by its class; say what it was, and the arguments that rebuild it.
    results["config"]["model"] = MODEL_NAME
    arm = ArmResult(label=lm.label, kind=kind, results=results, samples=samples, records=list(lm.records))
    by_doc: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in arm.records:
        by_doc[(str(r["task"]), int(r["doc_id"]))].append(r)
    for name, task in tasks.items():
        outputs = {int(r["doc_id"]): r["output_text"] for r in arm.records if r["task"] == name and r["repeat"] == 0}
        arm.taps_scores[name] = taps_scoring(reg, task, data_dir, outputs)
        for s in samples.get(name, []):  # the acceptance counters of each document, beside lm-eval's metrics
            s["taps_bench"] = [{k: r[k] for k in ("new_tokens", "steps", "accepted_by_depth", "draft_s",
                                                  "verify_s", "total_s", "stop_reason")}
                               | {"tau": r["new_tokens"] / r["steps"] if r["steps"] else None}
                               for r in by_doc[(name, int(s["doc_id"]))]]
            s["taps_bench_scorer"] = arm.taps_scores[name].get(int(s["doc_id"]))
    if tracker is not None:
        name = f"taps__{lm.target.name}__{lm.label}"
        tracker.general_config_tracker.model_name = name
        tracker.general_config_tracker.model_name_sanitized = sanitize_model_name(name)
        tracker.save_results_aggregated(results=results, samples=samples)
        for name in results.get("configs", {}):
            tracker.save_results_samples(task_name=name, samples=samples.get(name, []))
        folder = Path(opts.output or ".") / str(tracker.general_config_tracker.model_name_sanitized)
        written = sorted(folder.glob(f"results_{tracker.date_id}.json"))
        arm.results_file = written[-1] if written else None
    return arm


def identical_outputs(spec: ArmResult, base: ArmResult, task: str) -> dict[str, Any]:
    """Sample for sample: does the speculative arm emit the plain target's tokens, and get the same metrics?"""
    a, b = spec.outputs(task), base.outputs(task)
    keys = sorted(set(a) & set(b))
    same = [k for k in keys if a[k] == b[k]]
    da, db = _per_doc(spec.samples.get(task, [])), _per_doc(base.samples.get(task, []))
    docs = sorted(set(da) & set(db))
    same_metrics = [d for d in docs if da[d]["metrics"] == db[d]["metrics"]]
    return {"compared": len(keys), "identical_tokens": len(same), "different": [list(k) for k in keys if k not in same],
            "docs_compared": len(docs), "identical_metrics": len(same_metrics)}


def run(reg: Registry, opts: LmEvalOptions, echo: Any = print, err: Any = None) -> dict[str, Any]:
    """`taps-bench lm-eval`: validate cheaply, load the target once, evaluate the plain target (--baseline) and/or
    the speculative arm with lm-eval on local data, write lm-eval's JSON, store both arms, return a summary."""
    from taps_bench.data.tasks import resolve_data_dir
    from taps_bench.measure.resolve import check_proposer
    from taps_bench.models.targets import default_target_name
    from taps_bench.results.store import Store, as_url, default_db_url

    err = err or (lambda m: print(m, file=sys.stderr))
    if not opts.tasks:
        raise UserError("pass --tasks, e.g. --tasks gsm8k,minerva_math500")
    if opts.limit is not None and opts.limit < 1:
        raise UserError(f"--limit must be a positive integer (got {opts.limit})")
    if opts.max_gen_toks < 1:
        raise UserError(f"--max-gen-toks must be at least 1 (got {opts.max_gen_toks})")
    if opts.proposer is None and not opts.baseline:
        raise UserError("pass --drafter NAME (or --combiner NAME --drafters a,b), --baseline, or both")
    target_name = opts.target or default_target_name(reg.cards["target"])[0]  # type: ignore[arg-type]
    card = reg.target(target_name)
    if opts.proposer is not None:  # a bad proposer fails now, before lm-eval or the target are loaded
        check_proposer(reg, opts.proposer, card, opts.allow_pickle, opts.build)
    data_dir = resolve_data_dir(opts.data_dir)
    go_offline()
    if not opts.show_progress:
        import datasets

        datasets.disable_progress_bars()
    # The generated task YAMLs are needed only while lm-eval loads the tasks; the results JSON records the
    # resolved task configs themselves.
    with tempfile.TemporaryDirectory(prefix="taps-bench-lm-eval-") as workdir:
        tasks = write_local_tasks(opts.tasks, data_dir, Path(workdir), reg)
        manager = task_manager(Path(workdir))
        with Store(default_db_url() if opts.db is None else as_url(opts.db)) as store:
            arms, checks = _evaluate_arms(reg, opts, card, tasks, manager, store, data_dir, err)
    return summary(arms, checks, tasks, echo)


def _evaluate_arms(reg: Registry, opts: LmEvalOptions, card: Any, tasks: dict[str, LocalTask], manager: Any,
                   store: Any, data_dir: Path, err: Any) -> tuple[list[ArmResult], dict[str, Any]]:
    from taps_bench.measure import provenance
    from taps_bench.models.targets import load_target

    err(f"[taps-bench] lm-eval {metadata.version('lm_eval')}: tasks {', '.join(tasks)} on local data from "
        f"{data_dir}; target {card.name}; results in {opts.output or '(no --output: not written)'} and "
        f"{store.shown}")

    target = load_target(card, opts.device, opts.dtype)
    prov = provenance.collect(target) | {"lm_eval_version": metadata.version("lm_eval")}
    common = {"registry": reg, "loaded_target": target, "max_gen_toks": opts.max_gen_toks, "seed": opts.seed,
              "show_progress": opts.show_progress}
    arms: list[ArmResult] = []
    base: ArmResult | None = None
    if opts.baseline:
        base_lm = TapsLM(baseline=True, **common)
        base = evaluate_arm(base_lm, "baseline", tasks, manager, opts, reg, data_dir)
        for task in tasks.values():
            base.run_ids[task.name] = store_task(store, base_lm, base, task, opts, prov, None)
        arms.append(base)
    checks: dict[str, Any] = {}
    if opts.proposer is not None:
        lm = TapsLM(proposer=opts.proposer, total_tokens=opts.tree.total_tokens, depth=opts.tree.depth,
                    top_k=opts.tree.top_k, allow_pickle=opts.allow_pickle, build=opts.build,
                    data_dir=str(data_dir), **common)
        arm = evaluate_arm(lm, "speculative", tasks, manager, opts, reg, data_dir)
        for task in tasks.values():
            ref = base.outputs(task.name) if base else _stored_reference(store, lm, task, opts, arm.results)
            arm.run_ids[task.name] = store_task(store, lm, arm, task, opts, prov, ref)
            if base is not None:
                checks[task.name] = identical_outputs(arm, base, task.name)
        arms.append(arm)
    return arms, checks


_COLUMNS = [("arm", "arm"), ("task", "task"), ("metric", "metric"), ("value", "value"), ("n", "n"),
            ("taps_scorer", "taps-bench scorer"), ("tau", "tau"), ("tau_macro", "tau (macro)"),
            ("tokens_per_s", "tok/s")]


def summary(arms: list[ArmResult], checks: dict[str, Any], tasks: dict[str, LocalTask],
            echo: Any) -> dict[str, Any]:
    """Print the accuracy/tau table (and the sample-for-sample check) and return it as one JSON-able dict."""
    from taps_bench.results.report import format_table

    rows, out = [], {"arms": [], "identical_outputs": checks}
    for arm in arms:
        acc = arm.results["config"]["taps_bench"]
        arm_out: dict[str, Any] = {"arm": arm.label, "kind": arm.kind, "results_json": str(arm.results_file or ""),
                                   "run_ids": arm.run_ids, "tasks": {}}
        for name in tasks:
            stats = acc["by_task"].get(name, {})
            scores = arm.taps_scores.get(name, {})
            graded = [v["correct"] for v in scores.values() if v.get("correct") is not None]
            taps_acc = sum(graded) / len(graded) if graded else None
            metrics = {f"{m},{f}": v for m, f, v in _metric_items(arm.results["results"].get(name, {}))}
            n = arm.results.get("n-samples", {}).get(name, {}).get("effective")
            arm_out["tasks"][name] = {"metrics": metrics, "n": n, "taps_bench_scorer_accuracy": taps_acc,
                                      "tau": stats.get("tau"), "tau_macro": stats.get("tau_macro"),
                                      "tokens_per_s": stats.get("tokens_per_s"),
                                      "acceptance_by_depth": stats.get("acceptance_by_depth")}
            for i, (key, value) in enumerate(sorted(metrics.items())):
                first = i == 0
                rows.append({"arm": arm.label if first else "", "task": name if first else "", "metric": key,
                             "value": value, "n": n if first else None, "taps_scorer": taps_acc if first else None,
                             "tau": stats.get("tau") if first else None,
                             "tau_macro": stats.get("tau_macro") if first else None,
                             "tokens_per_s": stats.get("tokens_per_s") if first else None})
        out["arms"].append(arm_out)
    echo(format_table(rows, _COLUMNS))
    for arm in arms:
        if arm.kind != "speculative":
            continue
        for name in tasks:
            depth = arm.results["config"]["taps_bench"]["by_task"].get(name, {}).get("acceptance_by_depth") or []
            if depth:
                echo(f"{arm.label} on {name}: accepted at depth d | reached d-1: "
                     + ", ".join(f"d{d['depth']} {_pct(d['conditional'])}" for d in depth))
    spec = next((a for a in arms if a.kind == "speculative"), None)
    base = next((a for a in arms if a.kind == "baseline"), None)
    if spec is not None and base is not None:  # both arms in this process: speedup as every front end shows it
        out["speedup"] = {}
        for name in tasks:
            records = [[r for r in arm.records if r["task"] == name] for arm in (spec, base)]
            pair = summarize_pair(*records, greedy=all(r["temperature"] == 0 for r in records[0]))
            out["speedup"][name] = pair.speedup["ratio_of_sums"]
            echo(f"{spec.label} on {name}: speedup {speedup_text(pair.speedup)} over the plain target "  # 95% CI
                 f"(ratio of sums over {pair.speedup['n_matched']} requests)")
    for name, c in checks.items():
        echo(f"{name}: speculative output identical to the plain target's in {c['identical_tokens']}/"
             f"{c['compared']} requests; identical lm-eval metrics in {c['identical_metrics']}/{c['docs_compared']} "
             "documents")
    for arm in arms:
        if arm.results_file:
            echo(f"lm-eval results ({arm.label}): {arm.results_file}")
    return out


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"

