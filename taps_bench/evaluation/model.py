"""The lm-eval model `taps`: generation through the taps-bench engine, log-likelihoods with the target."""

from __future__ import annotations

import logging
import os
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from taps_bench.errors import UserError

try:
    import lm_eval.models  # noqa: F401  (registers lm-eval's own models first; see the note at `register_model`)
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise UserError("lm-evaluation-harness is not installed: pip install 'taps-bench[lm-eval]' "
                    f"({_exc})") from None

from taps_bench.catalog.cards import TreeOverride
from taps_bench.catalog.proposers import ProposerSpec
from taps_bench.catalog.registry import Registry
from taps_bench.data.chat import render_chat
from taps_bench.data.tasks import prompt_hash
from taps_bench.decoding.engine import generate
from taps_bench.decoding.proposer import Autoregressive
from taps_bench.evaluation.requests import StopStrings, cut_at_stops, flag, generation_request, opt_int, split_names
from taps_bench.models.targets import Target
from taps_bench.results.metrics import summarize
from taps_bench.results.samples import sample_record

log = logging.getLogger(__name__)

MODEL_NAME = "taps"

# -- the model -------------------------------------------------------------------------------------------------


# `register_model` on an empty registry would stop lm-eval's `get_model` from registering its built-in models
# lazily (it does so only while the registry is empty), hence `import lm_eval.models` above.
@register_model(MODEL_NAME)
class TapsLM(TemplateLM):
    """An lm-eval model that generates with the taps-bench speculative engine.

    model_args: target (a target name; default: the machine's default target), drafter (a name resolved for the
    target, or a checkpoint directory) or combiner + drafters (names joined by '+': `combiner=confidence,drafters=a+b`)
    with the combiner's options (any other model_arg, validated by the combiner's options model: alpha, granularity,
    budget for the built-ins), total_tokens / depth / top_k (tree; default: the target
    card's), baseline=true (the plain target: no drafter, the same engine), include (extra card directories,
    separated by os.pathsep), device, dtype, max_gen_toks (default for requests that set none; 256 as lm-eval's HF
    model), max_length (context; default: the model's), batch_size (loglikelihood batches), seed (sampling),
    allow_pickle, build (build a registered recipe drafter that is missing; default true), data_dir (training data
    for such a build). Python callers may also pass `registry` and `loaded_target` to share a loaded target.
    """

    backend = "causal"

    def __init__(self, target: str | None = None, drafter: str | None = None, combiner: str | None = None,
                 drafters: str | Sequence[str] | None = None, total_tokens: int | None = None,
                 depth: int | None = None, top_k: int | None = None, baseline: bool | str = False,
                 include: str | Sequence[str] | None = None, device: str | None = None, dtype: str | None = None,
                 max_gen_toks: int = 256, max_length: int | None = None, batch_size: int | str | None = 1,
                 max_batch_size: int | None = None, seed: int = 0, allow_pickle: bool | str = False,
                 build: bool | str = True, data_dir: str | None = None, show_progress: bool | str = True,
                 registry: Registry | None = None, loaded_target: Target | None = None,
                 proposer: ProposerSpec | None = None, **combiner_options: Any) -> None:
        super().__init__()
        from taps_bench.measure.resolve import build_proposer, build_recipes, check_proposer, fixed_tree, tree_settings
        from taps_bench.models.targets import default_target_name, load_target

        baseline = flag(baseline, "baseline")
        allow_pickle, build = flag(allow_pickle, "allow_pickle"), flag(build, "build")
        self.show_progress = flag(show_progress, "show_progress")
        if include and registry is not None:
            raise UserError("pass either include (card directories) or a loaded registry, not both")
        if registry is None:
            dirs = include.split(os.pathsep) if isinstance(include, str) else list(include or [])
            registry = Registry.load(include=[Path(d) for d in dirs if d])
        self.registry = registry
        spec = proposer or _proposer_spec(drafter, combiner, drafters, combiner_options)
        if baseline and spec is not None:
            raise UserError("baseline=true decodes with the plain target: pass no drafter or combiner with it")
        if not baseline and spec is None:
            raise UserError(f"model_args for '{MODEL_NAME}' need drafter=NAME, combiner=NAME,drafters=a+b, or "
                            "baseline=true")
        if loaded_target is None:
            name = str(target) if target else default_target_name(registry.cards["target"])[0]  # type: ignore[arg-type]
            card = registry.target(name)
        elif target and str(target) != loaded_target.name:
            raise UserError(f"target={target} but the loaded target is {loaded_target.name}")
        else:
            card = loaded_target.card
        recipes = []
        if spec is not None:  # fail on a bad drafter before spending time on the target
            spec, recipes = check_proposer(registry, spec, card, allow_pickle, build)
        loaded_target = loaded_target or load_target(card, device, dtype)
        self.target = loaded_target
        self.tokenizer = loaded_target.tokenizer
        self._device = loaded_target.device
        self.baseline = baseline
        if spec is None:
            self.proposer: Any = Autoregressive()
            self.label = "autoregressive"
            self.settings: dict[str, Any] = {}
        else:
            # lm-eval's requests are not a task card's prompts: an "auto" card decodes with its fallback tree here.
            override = TreeOverride(total_tokens=opt_int(total_tokens, "total_tokens"), depth=opt_int(depth, "depth"),
                                    top_k=opt_int(top_k, "top_k"))
            tree = fixed_tree(loaded_target, tree_settings(loaded_target, override, registry, spec))
            data = data_dir or os.environ.get("TAPS_BENCH_DATA")  # only read when a drafter must be built
            build_recipes(registry, recipes, loaded_target, Path(data) if data else None, self.show_progress)
            self.proposer, self.label, self.settings = build_proposer(registry, spec, loaded_target, tree,
                                                                      allow_pickle)
        self.spec = spec
        self._max_gen_toks = int(max_gen_toks)
        self._max_length = opt_int(max_length, "max_length")
        self.seed = int(seed)
        self._batch_size = int(batch_size) if str(batch_size or "1").isdigit() else 1  # "auto": one at a time
        del max_batch_size  # lm-eval passes it to every model; there is no automatic batch sizing here
        self.records: list[dict[str, Any]] = []
        self.loglikelihood_requests = 0
        self._warned: set[str] = set()

    # -- what lm-eval asks of a TemplateLM --------------------------------------------------------------------

    @property
    def model(self) -> Any:
        return self.target.model

    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def prefix_token_id(self) -> int:
        # As lm-eval's HF model: BOS conditions an empty context when the tokenizer has one.
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        if self._max_length:
            return self._max_length
        config = getattr(self.model.config, "text_config", None) or self.model.config
        for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
            if getattr(config, attr, None):
                return int(getattr(config, attr))
        return 2048

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        # As lm-eval's HF model: the tokenizer's own default, except that text which already starts with the BOS
        # token (a rendered chat template) gets no second one.
        if add_special_tokens is None:
            bos = self.tokenizer.bos_token
            special = {"add_special_tokens": False} if bos and string.startswith(bos) else {}
        else:
            special = {"add_special_tokens": add_special_tokens}
        ids = list(self.tokenizer.encode(string, **special))
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens))

    @property
    def tokenizer_name(self) -> str:
        # Fingerprints lm-eval's request cache: the target card fixes both the tokenizer and its chat template.
        return f"taps-bench__{self.target.name}"

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """As lm-eval's HF model: the tokenizer's template (the target card's when it declares one), with the
        card's template options; a template that rejects the system role is retried without it."""
        import jinja2

        def render(history: list[dict[str, str]]) -> str:
            return render_chat(self.tokenizer, self.target.card, history, generation_prompt=add_generation_prompt,
                               continue_final=not add_generation_prompt, with_system_prompt=False)

        try:
            return render(chat_history)
        except jinja2.exceptions.TemplateError:
            log.warning("the chat template failed; retrying without the system message")
            return render([m for m in chat_history if m.get("role") != "system"])

    # -- scoring with the target ------------------------------------------------------------------------------

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether greedy decoding would produce the continuation), batched by
        length with right padding (causal attention never looks at the padding after a row's last token)."""
        self.loglikelihood_requests += len(requests)
        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        bar = tqdm(total=len(requests), desc="loglikelihood", disable=disable_tqdm or not self.show_progress,
                   file=sys.stderr)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            inputs = []
            for i in chunk:
                _, context, continuation = requests[i]
                if not continuation or len(continuation) > self.max_length:
                    raise ValueError(f"continuation of {len(continuation)} tokens: need 1..{self.max_length}")
                # Too long for the model: drop context from the left, as lm-eval's HF model does.
                inputs.append((list(context) + list(continuation))[-(self.max_length + 1):][:-1])
            width = max(len(x) for x in inputs)
            ids = torch.full((len(inputs), width), int(pad), dtype=torch.long)
            mask = torch.zeros((len(inputs), width), dtype=torch.long)
            for row, x in enumerate(inputs):
                ids[row, :len(x)] = torch.tensor(x)
                mask[row, :len(x)] = 1
            logits = self.model(input_ids=ids.to(self._device), attention_mask=mask.to(self._device)).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            for row, i in enumerate(chunk):
                key, _, continuation = requests[i]
                n, end = len(continuation), len(inputs[row])
                lp = logprobs[row, end - n:end]  # position t predicts token t + 1
                want = torch.tensor(continuation, device=lp.device)
                answer = (float(lp.gather(-1, want[:, None]).sum()), bool((lp.argmax(dim=-1) == want).all()))
                results[i] = answer
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
            bar.update(len(chunk))
        bar.close()
        return [r for r in results if r is not None]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts in disjoint windows of the model's context (lm-eval's rolling scheme)."""
        from lm_eval import utils

        out = []
        for req in requests:
            (text,) = req.args
            windows = [(None, *utils.make_disjoint_window(w)) for w in utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1)]
            total = sum(ll for ll, _ in self._loglikelihood_tokens(windows, disable_tqdm=True))
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return out

    # -- generation with the speculative engine ---------------------------------------------------------------

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        outputs = []
        seen: dict[tuple[str, Any], int] = defaultdict(int)
        bar = tqdm(total=len(requests), desc=f"{self.label} ({self.target.name})", unit="request",
                   disable=disable_tqdm or not self.show_progress, file=sys.stderr, dynamic_ncols=True)
        tokens = seconds = 0.0
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        for inst in requests:
            context, gen_kwargs = inst.args
            req = generation_request(gen_kwargs, self.max_gen_toks, self.seed)
            if req.ignored:
                self._warn_once(f"ignored:{sorted(req.ignored)}", f"generation kwargs ignored by '{MODEL_NAME}': "
                                f"{sorted(req.ignored)}")
            # As lm-eval's HF model: the EOS text is a stop sequence too.
            until = [*req.until, eos_text] if eos_text and eos_text not in req.until else list(req.until)
            prompt_ids = self.tok_encode(context)
            room = self.max_length - req.max_gen_toks
            if room <= 0:
                raise UserError(f"max_gen_toks {req.max_gen_toks} leaves no room for a prompt in the model's "
                                f"{self.max_length}-token context")
            if len(prompt_ids) > room:  # as lm-eval's HF model: keep the end of a prompt that does not fit
                self._warn_once("truncated", f"prompts longer than {room} tokens are cut from the left")
                prompt_ids = prompt_ids[-room:]
            task, doc_id = getattr(inst, "task_name", None), getattr(inst, "doc_id", None)
            repeat = seen[(str(task), doc_id)]
            seen[(str(task), doc_id)] += 1
            gen = req.sampling.generator(task, doc_id, repeat)
            out = generate(self.model, prompt_ids, self.proposer, req.sampling, req.max_gen_toks,
                           self.target.stop_ids, gen, max_context=self.max_length,
                           stop_when=StopStrings(self.tokenizer, until))
            text = cut_at_stops(self.tok_decode(out.output_ids), until)
            record = sample_record(out, example_id=f"{task}:{doc_id}", turn=repeat, prompt_hash=prompt_hash(context),
                                   prompt_tokens=len(prompt_ids), output_text=text)
            # example_id/turn as the metrics module reads them (one question per task and document), and what the
            # store needs to key the sample by document (see `run.store_task`)
            self.records.append(record | {"task": task, "doc_id": doc_id, "repeat": repeat,
                                          "temperature": req.sampling.temperature, "max_gen_toks": req.max_gen_toks})
            c = out.counters
            outputs.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            tokens += c.new_tokens
            seconds += c.total_s
            bar.update(1)
            bar.set_postfix_str(f"tau {tokens / max(sum(r['steps'] for r in self.records), 1):.2f}, "
                                f"{tokens / max(seconds, 1e-9):.1f} tok/s")
        bar.close()
        return outputs

    # -- what lands in lm-eval's results ----------------------------------------------------------------------

    def acceptance(self) -> dict[str, Any]:
        """Acceptance statistics over every generation request so far, overall and per task."""
        by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in self.records:
            by_task[str(r["task"])].append(r)
        return {
            "target": self.target.name, "proposer": self.label, "baseline": self.baseline,
            "proposer_settings": self.settings, "generate_requests": len(self.records),
            "loglikelihood_requests": self.loglikelihood_requests,
            "definitions": "tau = new_tokens / steps (target forwards, prefill included; plain decoding gives 1); "
                           "tau_macro = mean over documents of their tau; acceptance_by_depth: accepted draft "
                           "tokens at depth d, conditional on reaching d-1 and per verify step",
            "overall": acceptance_summary(self.records),
            "by_task": {t: acceptance_summary(rs) for t, rs in sorted(by_task.items())},
        }

    def get_model_info(self) -> dict[str, Any]:
        """Called by `simple_evaluate` after the evaluation; it copies the dict into `results["config"]`."""
        return {"model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(self.target.dtype), "model_checkpoint": self.target.checkpoint,
                "taps_bench": self.acceptance()}


def _proposer_spec(drafter: str | None, combiner: str | None, drafters: str | Sequence[str] | None,
                   options: dict[str, Any]) -> ProposerSpec | None:
    """The proposer named by model_args (every argument the model does not know is an option of the combiner)."""
    if drafter is None and combiner is None and not drafters and not options:
        return None
    if drafter is None and combiner is None:
        raise UserError(f"unknown model_args for '{MODEL_NAME}': {', '.join(sorted(options)) or 'drafters'} "
                        "(combiner options need combiner=NAME)")
    try:
        return ProposerSpec(drafter=str(drafter) if drafter is not None else None, combiner=combiner,
                            drafters=split_names(drafters), **options)
    except ValueError as exc:
        raise UserError(f"model_args for '{MODEL_NAME}': {str(exc).splitlines()[-1].strip()}") from None


_SUMMARY_KEYS = ("n_samples", "new_tokens", "steps", "verify_steps", "tau", "tau_macro", "mean_accept_length",
                 "acceptance_by_depth", "acceptance_histogram", "mean_tree_size", "prefill_s", "draft_s", "verify_s",
                 "overhead_s", "wall_s", "tokens_per_s", "stop_reasons")


def acceptance_summary(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The metrics module's summary of generation records, without the fields lm-eval's own metrics cover."""
    s = summarize(records)
    out = {k: s[k] for k in _SUMMARY_KEYS}
    out["requests"] = out.pop("n_samples")
    # JSON object keys are text; make that explicit rather than leave it to the encoder.
    out["acceptance_histogram"] = {str(k): v for k, v in s["acceptance_histogram"].items()}
    return out


