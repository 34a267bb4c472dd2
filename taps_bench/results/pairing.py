"""How a speculative run finds its autoregressive baseline: the settings the two arms share.

A speculative run and its baseline decode the same prompts with the same target, data, device, precision, length
limit and sampling; only the proposer differs. These keys of a run's settings say so (the rest of a speculative
run's settings identify its proposer). lm-eval runs also carry their lm-eval task settings (`lm_eval`), which both
arms of one evaluation share; other runs have none, and None equals None. A run imported from a bundle pairs only
with a baseline from the same bundle (`submission_id`).
"""

from __future__ import annotations

from typing import Any

BASELINE_KEYS = ("target_checkpoint_sha256", "target_card", "task_card", "data_sha256", "device", "dtype",
                 "max_new_tokens", "sampling", "lm_eval")


def shared_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The part of a run's settings its baseline must have too."""
    return {k: settings.get(k) for k in BASELINE_KEYS}


def is_baseline_of(baseline: dict[str, Any], run: dict[str, Any]) -> bool:
    """Whether the stored run `baseline` is the autoregressive arm of the stored run `run`."""
    # An imported run pairs only with its own bundle's baseline (a submitter's timings are never set against ours).
    return (baseline["kind"] == "baseline" and baseline.get("submission_id") == run.get("submission_id")
            and baseline["target"] == run["target"] and baseline["task"] == run["task"]
            and float(baseline["temperature"]) == float(run["temperature"])
            and shared_settings(baseline["settings"]) == shared_settings(run["settings"]))
