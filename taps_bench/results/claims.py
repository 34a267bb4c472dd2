"""A bundle's raw counters checked against each other, against the output ids and against the run's settings.

A bundle is a set of claims. Every number the leaderboard shows is derived from raw counters (`results.metrics`),
so the counters themselves must be consistent: a verify step emits its accepted draft tokens plus one, so the
output length is tied to the accept lengths, tau = new_tokens / steps is tied to the trees, and the per-depth
counts follow from both. A counter edited on its own breaks one of these equations. What they cannot catch (the
same edit applied consistently to several counters, and timings) is what `taps-bench verify` re-measures, or stays
a claim (docs: README "Trust model").

Every check raises `ClaimError` with the first inconsistency, phrased for the one-line error of `import`.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

from taps_bench.results.schema import STOP_REASONS, output_hash

MAX_TOKEN_ID = 1 << 31
MAX_TURNS = 64
MAX_NEW_TOKENS = 1 << 16
MAX_TEMPERATURE = 100.0
# A speculative step verifies with a whole target forward, so its tokens/s can exceed plain decoding's by at most
# tau (the tokens one forward yields). Timing noise adds to that: at least 2x on arms that decoded for a while
# (`TIMED_S` of baseline decoding), far more on toy smoke runs of milliseconds (3.2x beyond tau measured on the
# tests' 2-layer target), which only a generous bound lets through honestly.
SPEEDUP_SLACK = 2.0
SPEEDUP_SLACK_UNTIMED = 20.0
TIMED_S = 0.5
_HEX64 = re.compile(r"[0-9a-f]{64}")
DTYPES = ("float32", "bfloat16", "float16")
HEAD_DTYPES = ("target", "auto", "float32", "bfloat16")

INT_FIELDS = ("turn", "new_tokens", "steps")
LIST_FIELDS = ("output_ids", "accept_lengths", "drafted_by_depth", "accepted_by_depth", "tree_sizes")
TIME_FIELDS = ("prefill_s", "draft_s", "verify_s", "total_s")
TEXT_FIELDS = ("output_text", "extracted", "gold")
FLAG_FIELDS = ("correct", "lossless")


class ClaimError(ValueError):
    """A bundle's claims do not hold together; the message names the field."""


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return (is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _int_list(sample: dict[str, Any], name: str, low: int = 0, high: int = MAX_TOKEN_ID) -> list[int]:
    values = sample.get(name)
    if not isinstance(values, list) or not all(is_int(v) and low <= v < high for v in values):
        raise ClaimError(f"{name} must be a list of integers in [{low}, {high})")
    return values


def check_fields(sample: dict[str, Any]) -> None:
    """Types and ranges of every sample field, before any relation between them is checked."""
    if not isinstance(sample.get("example_id"), str) or not 0 < len(sample["example_id"]) <= 255:
        raise ClaimError("example_id must be a non-empty string of at most 255 characters")
    for name in INT_FIELDS:
        if not is_int(sample.get(name)) or sample[name] < 0:
            raise ClaimError(f"{name} must be a non-negative integer (got {sample.get(name)!r:.40})")
    if sample["turn"] >= MAX_TURNS:
        raise ClaimError(f"turn {sample['turn']} is beyond {MAX_TURNS - 1}")
    for name in LIST_FIELDS:
        _int_list(sample, name)
    for name in TIME_FIELDS:
        if not is_number(sample.get(name)) or sample[name] < 0:
            raise ClaimError(f"{name} must be a finite, non-negative number of seconds")
    for name in TEXT_FIELDS:
        if sample.get(name) is not None and not isinstance(sample[name], str):
            raise ClaimError(f"{name} must be a string or null")
    for name in FLAG_FIELDS:
        if sample.get(name) is not None and not isinstance(sample[name], bool):
            raise ClaimError(f"{name} must be true, false or null")
    if not isinstance(sample.get("prompt_hash"), str) or not _HEX64.fullmatch(sample["prompt_hash"]):
        raise ClaimError("prompt_hash must be a sha256 hex digest")
    if not is_int(sample.get("prompt_tokens")) or sample["prompt_tokens"] < 1:
        raise ClaimError("prompt_tokens must be a positive integer")
    if sample.get("stop_reason") not in STOP_REASONS:
        raise ClaimError(f"stop_reason must be one of {', '.join(STOP_REASONS)}")
    if sample.get("output_hash") != output_hash(sample["output_ids"]):
        raise ClaimError("output_hash does not match output_ids")
    if not isinstance(sample.get("extra", {}), dict):
        raise ClaimError("extra must be an object")
    check_nodes(sample.get("extra", {}).get("nodes"))


def check_nodes(nodes: Any) -> None:
    """`extra.nodes` (per-drafter confidence and entropy of accepted/rejected draft tokens), which the site pools."""
    if nodes is None:
        return
    if not isinstance(nodes, dict):
        raise ClaimError("extra.nodes must be an object")
    for key, v in nodes.items():
        if not (isinstance(v, dict) and set(v) == {"n", "confidence", "entropy"} and is_int(v["n"]) and v["n"] >= 0
                and is_number(v["confidence"]) and 0 <= v["confidence"] <= 1 and is_number(v["entropy"])
                and v["entropy"] >= 0):
            raise ClaimError(f"extra.nodes[{key!r:.40}] must be {{n: count, confidence: 0..1, entropy: >= 0}}")


def check_counters(sample: dict[str, Any], kind: str, settings: dict[str, Any]) -> None:
    """The counters of one sample against each other and the run's settings (fields already type-checked)."""
    ids, accepts, sizes = sample["output_ids"], sample["accept_lengths"], sample["tree_sizes"]
    drafted, accepted = sample["drafted_by_depth"], sample["accepted_by_depth"]
    limit = settings["max_new_tokens"]
    if sample["new_tokens"] != len(ids):
        raise ClaimError(f"new_tokens is {sample['new_tokens']} but output_ids holds {len(ids)} tokens")
    if not 1 <= len(ids) <= limit:
        raise ClaimError(f"{len(ids)} output tokens, outside 1..max_new_tokens ({limit})")
    if sample["steps"] != 1 + len(accepts):
        raise ClaimError(f"steps is {sample['steps']} but there are {len(accepts)} verify steps (steps counts "
                         "the prefill too: steps = 1 + len(accept_lengths))")
    if len(sizes) != len(accepts):
        raise ClaimError(f"tree_sizes has {len(sizes)} entries for {len(accepts)} verify steps")
    # The prefill emits one token, each verify step its accepted draft tokens plus one; the last step may be cut
    # short by a stop token or the length limit.
    emitted = 1 + sum(a + 1 for a in accepts)
    least = emitted - accepts[-1] if accepts else 1
    if not least <= len(ids) <= emitted:
        raise ClaimError(f"{len(ids)} output tokens cannot come from accept lengths summing to {sum(accepts)} over "
                         f"{len(accepts)} verify steps (expected {least}..{emitted})")
    if (sample["stop_reason"] == "max_new_tokens") != (len(ids) == limit and sample["stop_reason"] not in
                                                        ("stop_token", "stop_string")):
        raise ClaimError(f"stop_reason {sample['stop_reason']!r} with {len(ids)} of max_new_tokens {limit} tokens")
    if kind == "baseline":
        if any(accepts) or any(s != 1 for s in sizes) or any(drafted) or accepted:
            raise ClaimError("an autoregressive sample drafts nothing: accept_lengths all 0, tree_sizes all 1, "
                             "drafted_by_depth and accepted_by_depth empty")
        return
    tree = settings["tree"]
    max_depth = tree["depth"] + 1  # EAGLE's depth counts expansions; the root's children are the first
    for j, (a, size) in enumerate(zip(accepts, sizes, strict=True)):
        if not 1 <= size <= tree["total_tokens"]:
            raise ClaimError(f"tree_sizes[{j}] is {size}, outside 1..tree.total_tokens ({tree['total_tokens']})")
        if a > min(size - 1, max_depth):
            raise ClaimError(f"accept_lengths[{j}] is {a}, more than the tree of {size} nodes and depth "
                             f"{max_depth} can hold")
    if len(drafted) > max_depth or sum(drafted) != sum(sizes) - len(sizes):
        raise ClaimError(f"drafted_by_depth sums to {sum(drafted)} over {len(drafted)} depths, but the trees hold "
                         f"{sum(sizes) - len(sizes)} draft nodes within depth {max_depth}")
    reached = Counter(accepts)
    expected = [sum(n for a, n in reached.items() if a >= d) for d in range(1, max(accepts, default=0) + 1)]
    if accepted != expected:
        raise ClaimError(f"accepted_by_depth {accepted[:8]} does not follow from accept_lengths ({expected[:8]})")
    if any(a > (drafted[d] if d < len(drafted) else 0) for d, a in enumerate(accepted)):
        raise ClaimError("accepted_by_depth exceeds drafted_by_depth at some depth")


def check_times(sample: dict[str, Any]) -> None:
    total = sample["total_s"]
    if total <= 0:
        raise ClaimError("total_s must be positive")
    parts = sample["prefill_s"] + sample["draft_s"] + sample["verify_s"]
    if parts > total * (1 + 1e-6) + 1e-9:
        raise ClaimError(f"prefill_s + draft_s + verify_s ({parts:.6g} s) exceed total_s ({total:.6g} s)")


def check_settings(run: dict[str, Any]) -> None:
    """The settings every counter check reads: the length limit, the sampling, and a speculative run's tree."""
    settings = run["settings"]
    limit = settings.get("max_new_tokens")
    if not is_int(limit) or not 1 <= limit <= MAX_NEW_TOKENS:
        raise ClaimError(f"settings.max_new_tokens must be an integer in 1..{MAX_NEW_TOKENS}")
    temperature = run["temperature"]
    if not is_number(temperature) or not 0 <= temperature <= MAX_TEMPERATURE:
        raise ClaimError(f"temperature must be a finite number in 0..{MAX_TEMPERATURE:g}")
    sampling = settings.get("sampling")
    if not isinstance(sampling, dict) or sampling.get("temperature") != temperature:
        raise ClaimError("settings.sampling.temperature must equal the run's temperature")
    check_sampling(sampling)
    for name in ("target_checkpoint_sha256", "data_sha256") + (("drafter_sha256",) if run["kind"] == "speculative"
                                                                else ()):
        if not isinstance(settings.get(name), str) or not _HEX64.fullmatch(settings[name]):
            raise ClaimError(f"settings.{name} must be a sha256 hex digest")
    if settings.get("dtype") not in DTYPES or not isinstance(settings.get("device"), str):
        raise ClaimError(f"settings.dtype must be one of {', '.join(DTYPES)} and settings.device a string")
    if run["kind"] == "speculative" and settings.get("draft_head_dtype") not in HEAD_DTYPES:
        raise ClaimError(f"settings.draft_head_dtype must be one of {', '.join(HEAD_DTYPES)}")
    check_provenance(run["provenance"])
    if run["kind"] == "speculative":
        tree = settings.get("tree")
        if not (isinstance(tree, dict) and all(is_int(tree.get(k)) and tree[k] >= 1
                                               for k in ("total_tokens", "depth", "top_k"))):
            raise ClaimError("settings.tree must hold positive integers total_tokens, depth and top_k")


def check_sampling(sampling: dict[str, Any]) -> None:
    """The sampling settings as `decoding.sampling.Sampling` takes them (verify rebuilds it from these)."""
    if set(sampling) != {"temperature", "top_p", "top_k", "seed"}:
        raise ClaimError("settings.sampling must hold exactly temperature, top_p, top_k and seed")
    if not (is_number(sampling["top_p"]) and 0 < sampling["top_p"] <= 1 and is_int(sampling["top_k"])
            and 0 <= sampling["top_k"] < MAX_TOKEN_ID and is_int(sampling["seed"]) and 0 <= sampling["seed"] < 2**63):
        raise ClaimError("settings.sampling: top_p in (0, 1], top_k and seed non-negative integers")


def check_provenance(provenance: dict[str, Any]) -> None:
    """The provenance fields the leaderboard shows (hardware line, versions) are short strings, threads a count."""
    for name in ("device", "device_name", "dtype", "platform", "git_commit", "target_checkpoint"):
        if provenance.get(name) is not None and not (isinstance(provenance[name], str)
                                                     and len(provenance[name]) <= 500):
            raise ClaimError(f"provenance.{name} must be a string of at most 500 characters")
    threads = provenance.get("threads")
    if threads is not None and not (is_int(threads) and 0 < threads <= 4096):
        raise ClaimError("provenance.threads must be a positive integer")
    versions = provenance.get("versions", {})
    if not isinstance(versions, dict) or not all(isinstance(k, str) and isinstance(v, (str, type(None)))
                                                 and len(k) + len(v or "") <= 200 for k, v in versions.items()):
        raise ClaimError("provenance.versions must map package names to version strings")


def check_run(run: dict[str, Any]) -> None:
    """One run record: its settings, then every sample (named by index in the message)."""
    check_settings(run)
    seen: set[tuple[str, int]] = set()
    greedy = run["temperature"] == 0
    for j, sample in enumerate(run["samples"]):
        try:
            check_fields(sample)
            check_counters(sample, run["kind"], run["settings"])
            check_times(sample)
            if not greedy and sample.get("lossless") is not None:
                raise ClaimError("lossless is only defined at temperature 0 (must be null)")
            if run["kind"] == "baseline" and sample.get("lossless") is not None:
                raise ClaimError("an autoregressive sample has no lossless flag (must be null)")
        except ClaimError as exc:
            raise ClaimError(f"samples[{j}]: {exc}") from None
        key = (sample["example_id"], sample["turn"])
        if key in seen:
            raise ClaimError(f"samples[{j}]: example {key[0]!r:.40} turn {key[1]} appears twice")
        seen.add(key)
    if not seen:
        raise ClaimError("a run without samples")
