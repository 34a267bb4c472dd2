"""taps-bench inside lm-evaluation-harness: the `taps` model, local-data task configs, and `taps-bench lm-eval`.

The model `taps` (registered with `lm_eval.api.registry.register_model`) answers every `generate_until` request with
the taps-bench engine (`engine.generate`) and the drafter or combiner named in its model_args, so any lm-eval
generation task runs speculatively; `loglikelihood` and `loglikelihood_rolling` score with the target directly.
At temperature 0 speculative decoding returns exactly the target's greedy tokens, so accuracy must not move: the
acceptance counters (new tokens, steps, tau, per-depth acceptance, draft and verify time) are collected over all
requests and handed to lm-eval through `get_model_info()`, which `simple_evaluate` copies into
`results["config"]`, so they land in the results JSON beside the accuracy.

lm-eval's own task definitions are used unchanged except for where the data comes from: for each requested task a
small YAML `include`s the stock one and points `dataset_path: json` at the local file under `$TAPS_BENCH_DATA`
(the local files have the hub datasets' columns, so no field mapping is needed), and the hub is switched off.

Import this module to register the model (`import taps_bench.evaluation`), then e.g.
`lm_eval.simple_evaluate(model="taps", model_args="target=smollm2-135m-instruct,drafter=mathinstruct-eagle2", ...)`.
"""

from taps_bench.evaluation.model import MODEL_NAME, TapsLM, acceptance_summary
from taps_bench.evaluation.requests import GenerationRequest, StopStrings, cut_at_stops, generation_request, split_names
from taps_bench.evaluation.run import (
    ArmResult,
    LmEvalOptions,
    evaluate_arm,
    identical_outputs,
    run,
    store_task,
    summary,
)
from taps_bench.evaluation.tasks import (
    LocalTask,
    find_task_yaml,
    go_offline,
    read_task_config,
    taps_golds,
    taps_scoring,
    task_manager,
    write_local_tasks,
)

__all__ = [
    "MODEL_NAME",
    "ArmResult",
    "GenerationRequest",
    "LmEvalOptions",
    "LocalTask",
    "StopStrings",
    "TapsLM",
    "acceptance_summary",
    "cut_at_stops",
    "evaluate_arm",
    "find_task_yaml",
    "generation_request",
    "go_offline",
    "identical_outputs",
    "read_task_config",
    "run",
    "split_names",
    "store_task",
    "summary",
    "taps_golds",
    "taps_scoring",
    "task_manager",
    "write_local_tasks",
]
