"""`taps-bench submit`: check a contributor's drafter and measure it the standard way into a result bundle.

Every registered task is smoke-tested (the paper's four, and any task card added with `--include` or an entry
point), so that a drafter that only works on one prompt format is caught before a maintainer spends a GPU on the
full matrix.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tqdm import tqdm

from taps_bench.catalog.registry import Registry
from taps_bench.catalog.submission import SubmissionCard
from taps_bench.errors import Interrupted, UserError
from taps_bench.results.bundle import FORMAT, VERSION, card_json, read_card, run_record, write_json
from taps_bench.results.store import Store


def locate_checkpoint(card: SubmissionCard, card_path: Path) -> tuple[Path, str]:
    """(local directory, portable description). The description identifies the run, so it is the source as the card
    writes it (never the contributor's absolute path): what a maintainer can resolve from the same card."""
    from taps_bench.models.drafter import fetch_from_hub

    src = card.checkpoint
    if src.hub:
        return fetch_from_hub(src.hub, src.revision), src.describe()
    assert src.path is not None
    directory = Path(src.path).expanduser()
    if not directory.is_absolute():
        directory = card_path.parent / directory
    if not directory.is_dir():
        raise UserError(f"checkpoint directory {directory} (from {card_path}) does not exist; fix `checkpoint: "
                        "{path: DIR}` (relative paths start at the card's directory)")
    return directory, src.describe()


def refuse_pickle(directory: Path) -> None:
    """Submissions must be safetensors: maintainers load every submitted checkpoint, and a pickle can run code."""
    if not (directory / "model.safetensors").is_file() and (directory / "pytorch_model.bin").is_file():
        raise UserError(f"{directory / 'pytorch_model.bin'} is a pickle checkpoint; submissions must be safetensors: "
                        "convert it with safetensors.torch.save_file(torch.load(path), 'model.safetensors')")


def refuse_official_name(card: SubmissionCard, card_path: Path, reg: Registry) -> None:
    """A submission named like a registered drafter or recipe would be credited with (or shadow) its results."""
    if card.name in reg.cards["drafter"] or card.name in reg.cards["recipe"]:
        raise UserError(f"submission card {card_path}: name: the name {card.name} belongs to an official drafter; "
                        "choose another")


def check_method(card: SubmissionCard, drafter: Any, directory: Path, where: str) -> None:
    """The method a card declares must be the checkpoint's family: an EAGLE-3 card measured with an EAGLE-2 file (or
    the reverse) would credit one method with the other's results. `other` may be either."""
    from taps_bench.models.eagle3 import Eagle3Drafter
    from taps_bench.models.eagle3_format import detect_format

    eagle3 = isinstance(drafter, Eagle3Drafter)
    if card.method == "eagle3" and not eagle3:
        raise UserError(f"{where}: method: eagle3, but the checkpoint {directory} is an EAGLE-1/2/HASS drafter (its "
                        "config.json has no draft_vocab_size); write `method: eagle2` or `method: hass`, or point "
                        "`checkpoint` at the EAGLE-3 drafter")
    if card.method in ("eagle2", "hass") and eagle3:
        layout = "speculators format" if detect_format(directory) == "speculators-eagle3" else "SafeAILab layout"
        raise UserError(f"{where}: method: {card.method}, but the checkpoint {directory} is an EAGLE-3 drafter "
                        f"({layout}); write `method: eagle3`")


def load_submitted(card: SubmissionCard, directory: Path, where: str) -> tuple[Any, Path]:
    """The submitted drafter in whichever format it is (EAGLE-1/2/HASS, EAGLE-3 in the SafeAILab layout or the
    speculators format) and its weights file, refused unless it is of the card's method."""
    from taps_bench.measure.resolve import load_any

    drafter, weights = load_any(directory)
    check_method(card, drafter, directory, where)
    return drafter, weights


def check_fits(drafter: Any, target: Any, name: str) -> None:
    """The drafter reads this loaded target's states and vocabulary (each family has its own check)."""
    from taps_bench.models.drafter import check_against_target
    from taps_bench.models.eagle3 import Eagle3Drafter
    from taps_bench.models.eagle3_format import check_eagle3_against_target

    if isinstance(drafter, Eagle3Drafter):
        check_eagle3_against_target(drafter, target.model.config, name)
    else:
        check_against_target(drafter, target.model.config, target.model.get_input_embeddings().weight, name)


def check_lossless(task: str, spec: list[dict[str, Any]], base: list[dict[str, Any]]) -> None:
    """At temperature 0 speculative decoding must reproduce the autoregressive output token for token."""
    from taps_bench.results.metrics import compare_outputs

    cmp = compare_outputs(spec, base)
    if cmp["mismatches"] or cmp["n_compared"] != len(spec) or not spec:
        first = f" (first: example {cmp['mismatches'][0][0]}, turn {cmp['mismatches'][0][1]})" \
            if cmp["mismatches"] else ""
        raise UserError(f"not lossless at temperature 0 on {task}: {cmp['n_equal']} of {len(spec)} speculative "
                        f"samples equal the autoregressive output{first}; no bundle written (on a GPU, retry with "
                        "--dtype float32)")


@dataclass
class Submission:
    """What `submit` did: the card, the bundle written, one summary row per task."""

    card: SubmissionCard
    path: Path
    rows: list[dict[str, Any]]


def submit(card_path: Path, reg: Registry, out: Path | None = None, limit: int = 2, max_new_tokens: int = 64,
           data_dir: str | Path | None = None, device: str | None = None, dtype: str | None = None,
           show_progress: bool = True) -> Submission:
    """`_submit`, saying on an interrupt what is true of submit (the CLI's default says a re-run resumes)."""
    try:
        return _submit(card_path, reg, out, limit, max_new_tokens, data_dir, device, dtype, show_progress)
    except KeyboardInterrupt as exc:
        if isinstance(exc, Interrupted):
            raise
        raise Interrupted(f"submit interrupted; nothing was kept and no bundle written (submit always starts from "
                          f"scratch, its temporary store is removed): re-run `taps-bench submit {card_path}` to "
                          "start again") from exc


def _submit(card_path: Path, reg: Registry, out: Path | None, limit: int, max_new_tokens: int,
            data_dir: str | Path | None, device: str | None, dtype: str | None,
            show_progress: bool) -> Submission:
    """Validate a submission and smoke-test it: both arms, T=0, the target's default tree, the first `limit` prompts
    of every task, into a throw-away store; require lossless decoding; write the result bundle.

    Everything that can be checked without the target (card, data, checkpoint files) is checked before the target is
    loaded, so a bad submission fails in a second with nothing written.
    """
    from taps_bench.data.tasks import data_file_hash, load_examples, resolve_data_dir
    from taps_bench.decoding.sampling import Sampling
    from taps_bench.measure import provenance
    from taps_bench.measure.resolve import ResolvedDrafter, eagle_proposer, fixed_tree
    from taps_bench.measure.runner import Arm, measure
    from taps_bench.models.targets import load_target, sha256_file

    if limit < 1:
        raise UserError(f"--limit must be a positive integer (got {limit})")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1 (got {max_new_tokens})")
    card = read_card(card_path)
    refuse_official_name(card, card_path, reg)
    target_card = reg.target(card.target)
    tasks = [reg.task(name) for name in sorted(reg.cards["task"])]
    directory = resolve_data_dir(data_dir)
    examples = {t.name: load_examples(t, directory, limit) for t in tasks}
    out = out if out is not None else card_path.parent / f"{card.name}.bundle.json"
    if not out.parent.is_dir():
        raise UserError(f"cannot write the bundle {out}: {out.parent} is not a directory; pass --out PATH")
    ckpt, where = locate_checkpoint(card, card_path)
    refuse_pickle(ckpt)
    drafter, weights = load_submitted(card, ckpt, f"submission card {card_path}")
    target = load_target(target_card, device, dtype)
    check_fits(drafter, target, card.name)
    n = sum(len(ex.turns) for exs in examples.values() for ex in exs)
    print(f"[taps-bench] submission '{card.name}' ({card.method}) on {target.name} ({target.device}, "
          f"{str(target.dtype).removeprefix('torch.')}): {n} samples per arm over "
          f"{', '.join(t.name for t in tasks)}", file=sys.stderr)

    prov = provenance.collect(target)
    resolved = ResolvedDrafter(name=card.name, drafter=drafter, checkpoint=where,
                               checkpoint_sha256=sha256_file(weights), card=None)
    proposer, settings = eagle_proposer(resolved, target, fixed_tree(target, target.card.tree))
    arm = Arm(kind="speculative", proposer=card.name, sampling=Sampling(temperature=0.0),
              max_new_tokens=max_new_tokens, settings=settings)
    rows, runs = [], []
    bar = tqdm(total=2 * n, desc=f"submit {card.name}", unit="sample", disable=not show_progress, file=sys.stderr,
               dynamic_ncols=True)
    # The store is throw-away: submit always measures from scratch, and the directory goes with it on any exit,
    # an interrupt included (only a kill -9 can leave it, in the system's temporary directory).
    with tempfile.TemporaryDirectory(prefix="taps-bench-submit-", ignore_cleanup_errors=True) as tmp:
        store = Store(f"sqlite:///{Path(tmp) / 'submit.sqlite'}")
        try:
            for task in tasks:
                m = measure(store, target, task, examples[task.name], proposer, arm,
                            data_file_hash(directory / task.source.local), prov, bar=bar)
                check_lossless(task.name, store.samples(m.run_id), store.samples(m.baseline_run_id))
                ss = m.summary.speculative
                rows.append({"task": task.name, "samples": ss["n_samples"], "tau": ss["tau"],
                             "speedup": m.summary.speedup["ratio_of_sums"], "lossless": True})
                runs += [run_record(store, m.baseline_run_id, None), run_record(store, m.run_id, card_json(card))]
        finally:
            bar.close()
            store.close()
    smoke = {"tasks": [t.name for t in tasks], "limit": limit, "max_new_tokens": max_new_tokens, "temperature": 0.0,
             "tree": fixed_tree(target, target.card.tree).model_dump()}
    write_json(out, {"format": FORMAT, "version": VERSION, "created_at": datetime.now(timezone.utc).isoformat(),
                     "submission": card_json(card), "provenance": prov, "smoke": smoke, "summary": rows,
                     "runs": runs})
    return Submission(card=card, path=out, rows=rows)


def summary_table(result: Submission) -> str:
    from taps_bench.results.report import format_table

    return format_table(result.rows, [("task", "task"), ("samples", "samples"), ("tau", "tau"),
                                      ("speedup", "speedup"), ("lossless", "lossless")])
