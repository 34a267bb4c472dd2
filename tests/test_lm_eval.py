"""lm-evaluation-harness integration: the `taps` model against lm-eval's own HF model, local-data tasks, the
`taps-bench lm-eval` command, and taps-bench's answer scoring compared with lm-eval's on the same outputs."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from packaging.version import Version

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is in the [lm-eval] and [test] extras")

from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM

from taps_bench import evaluation as lme
from taps_bench.catalog.registry import Registry
from taps_bench.cli import main
from taps_bench.errors import UserError
from taps_bench.results.store import Store, as_url

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tiny_smol: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny-smol target loaded once, and two random drafters for it."""
    from taps_bench.models.drafter import random_drafter, save_drafter
    from taps_bench.models.targets import load_target

    reg = Registry.load(include=[tiny_smol])
    target = load_target(reg.target("tiny-smol"))
    root = tmp_path_factory.mktemp("lm-eval-drafters")
    drafters = [root / "rand-a", root / "rand-b"]
    for seed, where in enumerate(drafters):
        save_drafter(random_drafter(target.model.config, seed, std=0.5), where)
    return {"reg": reg, "target": target, "drafters": drafters, "include": tiny_smol}


def _request(kind: str, args: tuple[Any, ...], doc_id: int, task: str = "t") -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0, metadata=(task, doc_id, 1))  # type: ignore[arg-type]


def _hf(target: Any) -> Any:
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=target.model, tokenizer=target.tokenizer, batch_size=1, device="cpu")


CONTEXTS = ["Question: Janet has 3 ducks and buys 2 more. How many ducks does she have?\nAnswer:",
            "Problem:\nWhat is $1 + 1$?\n\nSolution:", "Question: A train leaves at 3 pm.\nAnswer:"]


# -- the model against lm-eval's own HF model ------------------------------------------------------------------


def test_generation_equals_lm_eval_hf_model_with_and_without_drafter(tiny: dict[str, Any]) -> None:
    """Greedy outputs equal lm-eval's HF model's (transformers `generate`) on the same weights, for the plain target
    and with a drafter, also when a text stop sequence ends the generation in mid-step."""
    target, reg = tiny["target"], tiny["reg"]
    base = lme.TapsLM(baseline=True, registry=reg, loaded_target=target, show_progress=False)
    spec = lme.TapsLM(drafter=str(tiny["drafters"][0]), registry=reg, loaded_target=target, show_progress=False)
    hf = _hf(target)

    def requests(until: list[str]) -> list[Instance]:
        return [_request("generate_until", (c, {"until": until, "max_gen_toks": 12, "do_sample": False}), i)
                for i, c in enumerate(CONTEXTS)]

    plain = hf.generate_until(requests(["Question:"]))
    assert base.generate_until(requests(["Question:"])) == plain
    assert spec.generate_until(requests(["Question:"])) == plain
    # A stop string that occurs in the first output (a few characters in): every model must cut there.
    stop = plain[0][6:9]
    assert stop and stop in plain[0]
    cut = hf.generate_until(requests([stop]))
    assert cut[0] == plain[0].split(stop)[0]
    assert base.generate_until(requests([stop])) == cut
    assert spec.generate_until(requests([stop])) == cut
    stopped = [r for r in spec.records[-len(CONTEXTS):] if r["stop_reason"] == "stop_string"]
    assert stopped and all(r["new_tokens"] < 12 for r in stopped)
    # The speculative arm stops on the same token as the plain target, so their counters agree on new tokens.
    assert [r["output_ids"] for r in spec.records] == [r["output_ids"] for r in base.records]
    assert all(r["steps"] == r["new_tokens"] for r in base.records)  # plain decoding: tau 1
    assert spec.records[0]["drafted_by_depth"], "the drafter drafted nothing"


def test_loglikelihood_and_rolling_equal_lm_eval_hf_model(tiny: dict[str, Any]) -> None:
    target, reg = tiny["target"], tiny["reg"]
    ours = lme.TapsLM(baseline=True, registry=reg, loaded_target=target, show_progress=False)
    hf = _hf(target)
    greedy = ours.generate_until([_request("generate_until", (CONTEXTS[0], {"until": [], "max_gen_toks": 4}), 0)])[0]
    pairs = [(CONTEXTS[0], " 5"), (CONTEXTS[1], " 2"), ("", "hello world"), (CONTEXTS[0], greedy)]
    requests = [_request("loglikelihood", p, i) for i, p in enumerate(pairs)]
    want = hf.loglikelihood(requests)
    assert want[3][1], "the greedy continuation must be reported as greedy"
    for batch in (1, 3):  # one at a time, and batched with right padding
        ours._batch_size = batch
        got = ours.loglikelihood(requests)
        assert [g for _, g in got] == [g for _, g in want]
        assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in want], abs=1e-3)
    text = "The quick brown fox jumps over the lazy dog. " * 4
    rolling = [_request("loglikelihood_rolling", (text,), 0)]
    assert ours.loglikelihood_rolling(rolling) == pytest.approx(hf.loglikelihood_rolling(rolling), abs=1e-3)


def test_chat_template_as_lm_eval_hf_model(tiny: dict[str, Any]) -> None:
    target, reg = tiny["target"], tiny["reg"]
    ours = lme.TapsLM(baseline=True, registry=reg, loaded_target=target, show_progress=False)
    hf = _hf(target)
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]
    assert ours.apply_chat_template(history) == hf.apply_chat_template(history)
    prefill = [*history, {"role": "assistant", "content": "It is"}]
    assert ours.apply_chat_template(prefill, add_generation_prompt=False) == hf.apply_chat_template(
        prefill, add_generation_prompt=False)
    assert ours.chat_template(True) == hf.chat_template(True)
    assert ours.tokenizer_name == "taps-bench__tiny-smol"
    # A rendered template starts with the BOS text: no second BOS (as lm-eval's HF model).
    rendered = ours.apply_chat_template(history)
    assert ours.tok_encode(rendered) == hf.tok_encode(rendered)


# -- small pieces ----------------------------------------------------------------------------------------------


def test_generation_request_follows_lm_eval_conventions() -> None:
    r = lme.generation_request({"until": "Q:", "do_sample": False, "temperature": 0.7}, 256, 0)
    assert r.until == ["Q:"] and r.max_gen_toks == 256 and r.sampling.greedy  # do_sample=false wins
    r = lme.generation_request({"temperature": 0.0, "max_new_tokens": 9}, 256, 0)
    assert r.sampling.greedy and r.max_gen_toks == 9
    r = lme.generation_request({"temperature": 0.8, "top_p": 0.9, "max_gen_toks": 5, "max_tokens": 7}, 256, 3)
    assert r.sampling.temperature == 0.8 and r.sampling.top_p == 0.9 and r.sampling.seed == 3
    assert r.max_gen_toks == 5  # lm-eval's priority: max_gen_toks > max_new_tokens > max_tokens
    r = lme.generation_request({"do_sample": True, "temperature": 0.5, "repetition_penalty": 1.1}, 256, 0)
    assert r.ignored == {"repetition_penalty": 1.1} and not r.sampling.greedy
    assert lme.cut_at_stops("a\n\nQuestion: b", ["Question:", "\n\n"]) == "a"
    assert lme.split_names("a+b") == ("a", "b") and lme.split_names(["x", " y "]) == ("x", "y")


def test_engine_stop_when_ends_on_the_same_token_with_or_without_a_drafter(tiny: dict[str, Any]) -> None:
    from taps_bench.decoding.engine import generate
    from taps_bench.decoding.proposer import Autoregressive
    from taps_bench.decoding.sampling import Sampling

    target, reg = tiny["target"], tiny["reg"]
    spec = lme.TapsLM(drafter=str(tiny["drafters"][0]), registry=reg, loaded_target=target, show_progress=False)
    prompt = target.tokenizer(CONTEXTS[0]).input_ids
    full = generate(target.model, prompt, Autoregressive(), Sampling(), 10, ())
    for proposer in (Autoregressive(), spec.proposer):
        out = generate(target.model, prompt, proposer, Sampling(), 10, (), stop_when=lambda ids: len(ids) >= 4)
        assert out.output_ids == full.output_ids[:4]
        assert out.counters.stop_reason == "stop_string" and out.counters.new_tokens == 4


# -- lm-eval's tasks on local data -----------------------------------------------------------------------------


def test_local_tasks_read_the_local_files(tmp_path: Path, data_dir: Path) -> None:
    lme.go_offline()
    tasks = lme.write_local_tasks(["gsm8k", "minerva_math500"], data_dir, tmp_path)
    assert tasks["gsm8k"].files == {"test": data_dir / "gsm8k/test.jsonl", "train": data_dir / "gsm8k/train.jsonl"}
    cfg = lme.read_task_config(tasks["minerva_math500"].config_path)
    assert cfg["dataset_path"] == "json" and cfg["task"] == "minerva_math500"
    assert cfg["doc_to_text"].startswith("!function")  # the stock definition, included unchanged
    manager = lme.task_manager(tmp_path)
    names = ["gsm8k", "minerva_math500"]
    # TaskManager.load (lm-eval >= 0.4.11) replaced load_task_or_group.
    loaded = manager.load(names)["tasks"] if hasattr(manager, "load") else manager.load_task_or_group(names)
    gsm8k, math500 = loaded["gsm8k"], loaded["minerva_math500"]
    first = json.loads((data_dir / "gsm8k/test.jsonl").open().readline())
    assert len(gsm8k.test_docs()) == 1319 and gsm8k.test_docs()[0]["question"] == first["question"]
    assert len(gsm8k.fewshot_docs()) == 7473
    assert len(math500.test_docs()) == 500


def test_tasks_without_local_data_are_refused(tmp_path: Path, data_dir: Path) -> None:
    with pytest.raises(UserError, match="from the hub"):
        lme.write_local_tasks(["arc_easy"], data_dir, tmp_path)
    with pytest.raises(UserError, match="no task named"):
        lme.write_local_tasks(["no_such_task_xyz"], data_dir, tmp_path)
    with pytest.raises(UserError, match="not found"):
        lme.write_local_tasks(["gsm8k"], tmp_path / "empty", tmp_path)


# -- the command -----------------------------------------------------------------------------------------------


def _invoke(capsys: pytest.CaptureFixture[str], *args: Any) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_lm_eval_command_drafter_and_baseline(tiny: dict[str, Any], tmp_path: Path, data_dir: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Both arms on gsm8k and minerva_math500: same outputs and metrics sample for sample, tau beside accuracy in
    the printed table, the acceptance statistics in lm-eval's results JSON and samples, both arms in the store."""
    db, out = tmp_path / "r.sqlite", tmp_path / "out"
    rc, stdout, err = _invoke(capsys, "--include", tiny["include"], "lm-eval", "--tasks", "gsm8k,minerva_math500",
                              "--drafter", tiny["drafters"][0], "--baseline", "--target", "tiny-smol", "--limit", 2,
                              "--max-gen-toks", 6, "--output", out, "--db", db, "--data-dir", data_dir,
                              "--no-progress", "--json")
    assert rc == 0, err
    result = json.loads(stdout.strip().splitlines()[-1])
    assert "exact_match,strict-match" in stdout and "tau" in stdout
    for task in ("gsm8k", "minerva_math500"):
        assert result["identical_outputs"][task] == {"compared": 2, "identical_tokens": 2, "different": [],
                                                     "docs_compared": 2, "identical_metrics": 2}
    base, spec = result["arms"]
    assert (base["kind"], spec["kind"]) == ("baseline", "speculative")
    assert base["tasks"]["gsm8k"]["metrics"] == spec["tasks"]["gsm8k"]["metrics"]
    assert base["tasks"]["gsm8k"]["tau"] == 1.0 and spec["tasks"]["gsm8k"]["tau"] is not None

    written = json.loads(Path(spec["results_json"]).read_text())
    acc = written["config"]["taps_bench"]
    assert written["config"]["model"] == "taps" and acc["proposer"] == "rand-a"
    assert acc["generate_requests"] == 4 and set(acc["by_task"]) == {"gsm8k", "minerva_math500"}
    by_task = acc["by_task"]["gsm8k"]
    assert by_task["tau"] == by_task["new_tokens"] / by_task["steps"]
    assert by_task["acceptance_by_depth"] and by_task["draft_s"] > 0
    assert "exact_match,strict-match" in written["results"]["gsm8k"]
    samples = [json.loads(line) for line in next(Path(spec["results_json"]).parent.glob("samples_gsm8k_*.jsonl"))
               .read_text().splitlines()]
    assert samples and all(s["taps_bench"][0]["steps"] >= 1 for s in samples)
    assert all("correct" in s["taps_bench_scorer"] for s in samples)

    store = Store(as_url(str(db)))
    runs = {(r["kind"], r["task"]): r for r in store.runs()}
    assert set(runs) == {(k, f"lm-eval:{t}") for k in ("baseline", "speculative") for t in ("gsm8k", "minerva_math500")}
    run = runs[("speculative", "lm-eval:gsm8k")]
    assert run["proposer"] == "rand-a" and run["settings"]["lm_eval"]["num_fewshot"] == 5
    for key in ("target_checkpoint_sha256", "task_card", "data_sha256", "max_new_tokens", "sampling"):
        assert run["settings"][key] == runs[("baseline", "lm-eval:gsm8k")]["settings"][key]
    stored = store.samples(run["id"])
    assert len(stored) == 2 and all(s["lossless"] is True and s["correct"] is not None for s in stored)
    assert stored[0]["extra"]["lm_eval"]["primary_metric"] == "exact_match,strict-match"
    assert stored[0]["gold"].endswith("#### 18")


def test_lm_eval_command_combiner_reuses_the_stored_baseline(tiny: dict[str, Any], tmp_path: Path, data_dir: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "r.sqlite"
    common = ["--include", tiny["include"], "lm-eval", "--tasks", "gsm8k", "--target", "tiny-smol", "--limit", 1,
              "--max-gen-toks", 4, "--output", tmp_path / "out", "--db", db, "--data-dir", data_dir, "--no-progress"]
    rc, _, err = _invoke(capsys, *common, "--baseline")
    assert rc == 0, err
    a, b = tiny["drafters"]
    rc, stdout, err = _invoke(capsys, *common, "--combiner", "confidence", "--drafters", f"{a},{b}", "--json")
    assert rc == 0, err
    result = json.loads(stdout.strip().splitlines()[-1])
    assert [arm["kind"] for arm in result["arms"]] == ["speculative"]
    store = Store(as_url(str(db)))
    spec = next(r for r in store.runs() if r["kind"] == "speculative")
    assert spec["settings"]["combiner"] == "confidence"
    # No --baseline this time: the lossless check used the plain-target run stored by the first command.
    assert [s["lossless"] for s in store.samples(spec["id"])] == [True]


def test_lm_eval_command_refuses_bad_input_before_writing(tiny: dict[str, Any], tmp_path: Path, data_dir: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "r.sqlite"
    base = ["--include", tiny["include"], "lm-eval", "--target", "tiny-smol", "--db", db, "--data-dir", data_dir]
    rc, _, err = _invoke(capsys, *base, "--tasks", "gsm8k")
    assert rc == 2 and "--drafter" in err
    rc, _, err = _invoke(capsys, *base, "--tasks", "arc_easy", "--baseline")
    assert rc == 2 and "from the hub" in err
    rc, _, err = _invoke(capsys, *base, "--tasks", "gsm8k", "--drafter", "no-such-drafter")
    assert rc == 2 and "no-such-drafter" in err
    assert not db.exists()


def test_registered_model_runs_from_lm_eval_with_model_args(tiny: dict[str, Any], tmp_path: Path,
                                                           data_dir: Path) -> None:
    """`taps` from lm-eval's side: its registry, model_args text, chat template; the counters in the results."""
    from lm_eval.api.registry import get_model

    assert get_model("taps") is lme.TapsLM
    assert get_model("hf").__name__ == "HFLM"  # registering ours left lm-eval's own models registered
    lme.go_offline()
    lme.write_local_tasks(["gsm8k"], data_dir, tmp_path)
    a, b = tiny["drafters"]
    args = f"target=tiny-smol,combiner=merged-tree,drafters={a}+{b},include={tiny['include']},max_gen_toks=3"
    results = simple_evaluate(model="taps", model_args=args, tasks=["gsm8k"], task_manager=lme.task_manager(tmp_path),
                              limit=1, apply_chat_template=True, fewshot_as_multiturn=True, log_samples=True)
    assert results is not None
    acc = results["config"]["taps_bench"]
    assert acc["generate_requests"] == 1 and acc["proposer_settings"]["combiner"] == "merged-tree"
    prompt = results["samples"]["gsm8k"][0]["arguments"][0][0]
    assert prompt.startswith("<|im_start|>") and prompt.count("<|im_start|>user") == 6  # 5 shots + the question


# -- taps-bench's scoring against lm-eval's, on the same outputs ------------------------------------------------


class CannedLM(LM):
    """Answers each generation request with a fixed text per (task, doc): lm-eval then scores it its own way."""

    def __init__(self, outputs: dict[str, list[str]]) -> None:
        super().__init__()
        self.outputs = outputs

    def generate_until(self, requests: list[Instance]) -> list[str]:
        return [self.outputs[str(r.task_name)][int(r.doc_id or 0)] for r in requests]

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError

    def loglikelihood_rolling(self, requests: list[Instance]) -> list[float]:
        raise NotImplementedError


# Outputs for the first documents of GSM8K (gold answers 18, 3, 70000, 540, 20, 64, 260, 160) and what each scorer
# says: (output, taps-bench `number` scorer, lm-eval strict-match, lm-eval flexible-extract).
GSM8K_CASES = [
    ("She makes 9 * 2 = 18 dollars.\n#### 18", True, True, True),
    ("The answer is 3.", True, False, True),  # strict-match wants "#### N"; taps-bench's prompt asks for this form
    ("#### 70,000", True, True, True),  # both drop thousands separators
    ("The answer is 540. Each egg costs $2.", True, False, False),  # flexible takes the last number (2)
    ("The answer is 20.00", True, False, False),  # lm-eval compares text ("20.00" != "20"), taps-bench numbers
    ("#### 64 dollars", True, True, True),
    ("#### 261", False, False, False),
    ("The answer is 159.\nWait, 160 is right: 160", False, False, True),  # taps-bench trusts the marker's line
]
# The first documents of MATH-500 (gold \left( 3, \frac{\pi}{2} \right), p - q, \frac{14}{3}, 9, \text{Evelyn},
# 42, 27, 90^\circ): (output, taps-bench `math` scorer, lm-eval exact_match, lm-eval math_verify).
# lm-eval before 0.4.13 scored a tuple answer identical to the gold as wrong (sympy cannot parse tuples).
_TUPLES_FIXED = Version(metadata.version("lm_eval")) >= Version("0.4.13")
MATH500_CASES = [
    ("Final Answer: The final answer is $\\left( 3, \\frac{\\pi}{2} \\right)$. I hope it is correct.", True,
     _TUPLES_FIXED, True),
    ("So the answer is $\\boxed{p - q}$.", True, False, True),  # minerva's exact_match reads only "Final Answer: ..."
    ("Final Answer: The final answer is $\\dfrac{14}{3}$. I hope it is correct.", True, True, True),
    ("The answer is 9.", True, False, True),
    ("Final Answer: The final answer is Evelyn. I hope it is correct.", False, True, False),  # text: math-verify fails
    ("Final Answer: The final answer is $0$. I hope it is correct.", False, False, False),
    ("$\\boxed{27}$", True, False, True),
    ("Final Answer: The final answer is $90$. I hope it is correct.", True, True, True),  # "^\circ" dropped by all
]


def test_taps_bench_scoring_against_lm_eval_scoring(tmp_path: Path, data_dir: Path) -> None:
    """Score the same outputs with taps-bench's scorer and with lm-eval's task pipeline (filters, metrics) and
    check where they agree and differ (see README, "Accuracy with lm-evaluation-harness")."""
    lme.go_offline()
    tasks = lme.write_local_tasks(["gsm8k", "minerva_math500"], data_dir, tmp_path)
    outputs = {"gsm8k": [c[0] for c in GSM8K_CASES], "minerva_math500": [c[0] for c in MATH500_CASES]}
    results = simple_evaluate(model=CannedLM(outputs), tasks=list(tasks), task_manager=lme.task_manager(tmp_path),
                              limit=len(GSM8K_CASES), log_samples=True)
    assert results is not None
    reg = Registry.load()
    for task, cases, metrics in (("gsm8k", GSM8K_CASES, ("exact_match,strict-match", "exact_match,flexible-extract")),
                                 ("minerva_math500", MATH500_CASES, ("exact_match,none", "math_verify,none"))):
        taps = lme.taps_scoring(reg, tasks[task], data_dir, dict(enumerate(outputs[task])))
        lm_eval_scores: dict[int, dict[str, bool]] = {}
        for s in results["samples"][task]:
            for m in s["metrics"]:
                lm_eval_scores.setdefault(int(s["doc_id"]), {})[f"{m},{s['filter']}"] = bool(s[m])
        got = [(out, taps[i]["correct"], *(lm_eval_scores[i][m] for m in metrics))
               for i, out in enumerate(outputs[task])]
        assert got == cases
