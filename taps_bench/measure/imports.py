"""`taps-bench import`: bundles checked as claims against this maintainer's registry, then stored as submissions.

`results.bundle.read_bundle` checks what a bundle says about itself (format, types, counters, pairs). This module
checks what it says about the world the maintainer knows: the target and tasks it claims to have measured are
registered here with the same cards and the checkpoint the registry knows, the drafter name is the submission's
own (never an official drafter's, never another submission's), each speculative run carries the submission card
and nothing else, and the graded answers follow from the outputs by the task's own scorer. Then each bundle is
stored in one transaction (`results.submissions.insert`), so a refused bundle leaves the database as it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taps_bench.catalog.registry import Registry
from taps_bench.data.scoring import extract_answer, is_correct
from taps_bench.errors import UserError
from taps_bench.measure.runner import card_digest
from taps_bench.results import submissions
from taps_bench.results.bundle import read_bundle
from taps_bench.results.claims import ClaimError
from taps_bench.results.store import Store


@dataclass
class ImportCounts:
    bundles: int = 0
    new: int = 0  # bundles stored now
    present: int = 0  # bundles already stored (same bytes): importing again adds nothing
    runs: int = 0
    samples: int = 0


def known_checkpoint(reg: Registry, target: str) -> str:
    """The target checkpoint sha256 this registry vouches for (its card's `checkpoint_sha256`)."""
    card = reg.target(target)
    if not card.checkpoint_sha256:
        raise ClaimError(f"the registry does not know the checkpoint of target {target} (its card declares no "
                         "`checkpoint_sha256`), so no submitted board can be made for it; declare the hash in the "
                         "target card first")
    return card.checkpoint_sha256


def check_against_registry(reg: Registry, data: dict[str, Any]) -> None:
    """What the bundle claims about targets, tasks and drafters, against what this registry knows (`ClaimError`)."""
    card = data["submission"]
    name = card["name"]
    if name in reg.cards["drafter"] or name in reg.cards["recipe"]:
        raise ClaimError(f"the drafter name {name} belongs to an official drafter of this registry; a submission "
                         "must use a name of its own")
    try:
        target = reg.target(card["target"])
    except UserError as exc:
        raise ClaimError(f"submission.target: {exc}") from None
    checkpoint = known_checkpoint(reg, target.name)
    for i, run in enumerate(data["runs"]):
        where, settings = f"runs[{i}]", run["settings"]
        if run["target"] != target.name:
            raise ClaimError(f"{where}.target is {run['target']!r:.60}, the submission's target is {target.name}")
        try:
            task = reg.task(run["task"])
        except UserError as exc:
            raise ClaimError(f"{where}.task: {exc}") from None
        if settings.get("target_card") != card_digest(target):
            raise ClaimError(f"{where}: measured with another version of the {target.name} card than this "
                             "registry's (settings.target_card); re-run `taps-bench submit` with this release")
        if settings.get("task_card") != card_digest(task):
            raise ClaimError(f"{where}: measured with another version of the {task.name} task card than this "
                             "registry's (settings.task_card); re-run `taps-bench submit` with this release")
        if settings.get("target_checkpoint_sha256") != checkpoint:
            raise ClaimError(f"{where}: the target checkpoint's sha256 is not the one the registry knows for "
                             f"{target.name}")
        check_run_owner(run, card, where)
        check_grades(run, task.scorer, where)


def check_run_owner(run: dict[str, Any], card: dict[str, Any], where: str) -> None:
    """A speculative run is the submission's drafter with the submission's card; a baseline has no drafter."""
    prov = run["provenance"]
    if run["kind"] == "speculative":
        if run["proposer"] != card["name"]:
            raise ClaimError(f"{where}.proposer is {run['proposer']!r:.60}, not the submission's name {card['name']}")
        if prov.get("drafter_card", card) != card:
            raise ClaimError(f"{where}.provenance.drafter_card is not the submission card")
        expected = describe_checkpoint(card)
        if run["settings"].get("drafter_checkpoint") != expected:
            raise ClaimError(f"{where}.settings.drafter_checkpoint must be {expected} (as the card says)")
    elif run["proposer"] != "autoregressive" or "drafter_card" in prov:
        raise ClaimError(f"{where}: a baseline run is `autoregressive` and carries no drafter card")


def describe_checkpoint(card: dict[str, Any]) -> str:
    from taps_bench.catalog.submission import SubmissionCard

    return SubmissionCard.model_validate(card).checkpoint.describe()


def check_grades(run: dict[str, Any], scorer: str, where: str) -> None:
    """`extracted` and `correct` are what the task's scorer reads from `output_text` and the gold (the gold itself,
    and the text against the token ids, are checked by `taps-bench verify`, which has the data and tokenizer)."""
    for j, s in enumerate(run["samples"]):
        gold, text = s.get("gold"), s.get("output_text") or ""
        want = (extract_answer(scorer, text), is_correct(scorer, text, gold)) if gold is not None else (None, None)
        if (s.get("extracted"), s.get("correct")) != want:
            raise ClaimError(f"{where}.samples[{j}]: extracted/correct ({s.get('extracted')!r:.30}, "
                             f"{s.get('correct')}) are not what the {scorer} scorer gives for its output_text "
                             f"({want[0]!r:.30}, {want[1]})")


def import_bundles(paths: list[Path], db_url: str, reg: Registry) -> tuple[ImportCounts, str]:
    """Check every bundle whole (nothing is written before all pass), then store each new one in one transaction.
    Returns the counts and the database as shown to users."""
    checked = []
    for path in paths:
        data, sha = read_bundle(path)
        try:
            check_against_registry(reg, data)
        except ClaimError as exc:
            raise UserError(f"bundle {path}: {exc}; nothing was imported") from None
        checked.append((path, data, sha))
    counts = ImportCounts(bundles=len(checked))
    with Store(db_url) as store:
        fresh: dict[str, tuple[Path, dict[str, Any], str]] = {}
        for path, data, sha in checked:
            if sha in fresh or submissions.by_hash(store, sha) is not None:
                continue
            name = data["submission"]["name"]
            holders = [s for s in submissions.by_name(store, name) if s["bundle_sha256"] != sha]
            clash = next((p for p, d, _ in fresh.values() if d["submission"]["name"] == name), None)
            if holders or clash is not None:
                held = f"submission {holders[0]['bundle_sha256'][:12]}" if holders else f"bundle {clash}"
                raise UserError(f"bundle {path}: the drafter name {name} is already held by {held}; a new version "
                                "of a drafter needs a new name; nothing was imported")
            fresh[sha] = (path, data, sha)
        for _, data, sha in fresh.values():
            submissions.insert(store, sha, data["submission"], data["provenance"], data["runs"])
            counts.runs += len(data["runs"])
            counts.samples += sum(len(r["samples"]) for r in data["runs"])
        counts.new = len(fresh)
        counts.present = counts.bundles - counts.new
        return counts, store.shown
