"""The two EAGLE-3 checkpoint formats, read strictly (like `drafter.load_drafter`), and telling drafter formats apart.

SafeAILab (EAGLE repository): a Llama-style `config.json` with `draft_vocab_size` (and optional
`target_hidden_size`), weights named as `eagle3.expected_shapes` lists (`fc.weight`, `midlayer.*`, `norm.weight`,
`lm_head.weight`, `d2t`, `t2d`, optional `embed_tokens.weight`; SafeAILab's training saves without the frozen
embedding, and a same-vocabulary drafter drops d2t/t2d at load).

speculators (vllm-project): `config.json` with `speculators_model_type: eagle3`, `speculators_config` (algorithm,
proposal_methods, default_proposal_method, verifier), the layer's own config in `transformer_layer_config` (a Qwen3
layer unless its `model_type` says llama), `draft_vocab_size` and the options below; the same weights with
`midlayer.` renamed `layers.0.` (its converter does exactly that rename), plus `input_norm.weight` under
`norm_before_fc` and `fc_norm.<i>.weight` under `fc_norm`.

`save_safeailab` and `save_speculators` write the two layouts back (what `taps-bench export-drafter` writes).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

from taps_bench.errors import UserError
from taps_bench.models.drafter import check_finite, read_config, read_state
from taps_bench.models.eagle3 import (
    Eagle3Config,
    Eagle3Drafter,
    aux_layers_for,
    expected_shapes,
    load_state,
    vocab_map_problem,
)
from taps_bench.paths import write_atomic

FORMATS = ("eagle", "eagle3", "speculators-eagle3")
SPECULATORS_OPTIONS = ("norm_before_residual", "norm_before_fc", "fc_norm", "norm_output")
# Top-level speculators keys read here, or harmless for inference (training flags, provenance).
SPECULATORS_KNOWN = {"speculators_model_type", "speculators_version", "speculators_config", "transformer_layer_config",
                     "draft_vocab_size", "target_hidden_size", "eagle_aux_hidden_state_layer_ids",
                     "embed_requires_grad", "architectures", *SPECULATORS_OPTIONS}


def detect_format(directory: str | Path) -> str:
    """"eagle" (EAGLE-1/2/HASS), "eagle3" (SafeAILab) or "speculators-eagle3", from config.json alone."""
    raw, cfg_path = _config(Path(directory))
    if "speculators_model_type" in raw:
        if raw["speculators_model_type"] != "eagle3":
            raise UserError(f"{cfg_path}: speculators model type `{raw['speculators_model_type']}` is not supported; "
                            "only eagle3 is")
        return "speculators-eagle3"
    if "draft_vocab_size" in raw:
        return "eagle3"
    if "hidden_size" in raw:
        return "eagle"
    raise UserError(f"{cfg_path}: not a drafter format taps-bench reads: no `speculators_model_type` (speculators), "
                    "no `draft_vocab_size` (SafeAILab EAGLE-3) and no `hidden_size` (EAGLE-1/2/HASS)")


def load_eagle3(directory: str | Path, allow_pickle: bool = False) -> tuple[Eagle3Drafter, Path]:
    """Strictly load an EAGLE-3 drafter in either format (float32, CPU); returns it and its weights file."""
    fmt = detect_format(directory)
    if fmt == "eagle":
        raise UserError(f"{directory}: an EAGLE-1/2/HASS drafter (no `draft_vocab_size`), not EAGLE-3")
    return load_speculators(directory, allow_pickle) if fmt == "speculators-eagle3" else load_safeailab(
        directory, allow_pickle)


def load_safeailab(directory: str | Path, allow_pickle: bool = False) -> tuple[Eagle3Drafter, Path]:
    raw, cfg_path = _config(Path(directory))
    where = str(cfg_path)
    layer = _layer(raw, where)
    if "head_dim" in raw and raw["head_dim"] != layer["hidden_size"] // layer["heads"]:
        raise UserError(f"{where}: `head_dim` {raw['head_dim']} is not hidden_size / num_attention_heads, the only "
                        "head size SafeAILab's EAGLE-3 layer has")
    aux = None
    eagle = raw.get("eagle_config")
    if eagle is not None:
        if not isinstance(eagle, dict):
            raise UserError(f"{where}: `eagle_config` must be an object")
        if eagle.get("use_aux_hidden_state", True) is not True:
            raise UserError(f"{where}: `eagle_config.use_aux_hidden_state` false (EAGLE-3 without the three target "
                            "states) is not implemented")
        ids = _layer_ids(eagle, "eagle_aux_hidden_state_layer_ids", where)
        # SGLang/SpecForge count layer outputs: id i is the state leaving layer i, entering layer i + 1.
        aux = None if ids is None else tuple(i + 1 for i in ids)
    config = Eagle3Config(**layer, head_dim=layer["hidden_size"] // layer["heads"],
                          draft_vocab_size=_int(raw, "draft_vocab_size", where),
                          target_hidden_size=_int(raw, "target_hidden_size", where, layer["hidden_size"]),
                          aux_layers=aux)
    return _build(config, Path(directory), allow_pickle, where, rename=False)


def load_speculators(directory: str | Path, allow_pickle: bool = False) -> tuple[Eagle3Drafter, Path]:
    raw, cfg_path = _config(Path(directory))
    where = str(cfg_path)
    for key in raw:
        if key not in SPECULATORS_KNOWN and key not in _GENERIC_KEYS:
            raise UserError(f"{where}: speculators option `{key}` is not implemented")
    _speculators_config(raw.get("speculators_config"), where)
    tl = raw.get("transformer_layer_config")
    if not isinstance(tl, dict):
        raise UserError(f"{where}: `transformer_layer_config` must be an object (the drafter layer's config)")
    tl_where = f"{where}: transformer_layer_config"
    kind = tl.get("model_type", "qwen3")  # speculators builds a Qwen3 layer when the type is not given
    if kind not in ("llama", "qwen3"):
        raise UserError(f"{tl_where}: `model_type` {kind!r} is not implemented (llama or qwen3)")
    layer = _layer(tl, tl_where)
    options = {name: _bool(raw, name, where) for name in SPECULATORS_OPTIONS}
    if options["norm_before_fc"] and options["fc_norm"]:
        raise UserError(f"{where}: `norm_before_fc` and `fc_norm` exclude each other")
    ids = _layer_ids(raw, "eagle_aux_hidden_state_layer_ids", where)
    config = Eagle3Config(**layer, head_dim=_int(tl, "head_dim", tl_where, layer["hidden_size"] // layer["heads"]),
                          draft_vocab_size=_int(raw, "draft_vocab_size", where),
                          target_hidden_size=_int(raw, "target_hidden_size", where, layer["hidden_size"]),
                          # vLLM captures the state entering layer id: a speculators id is the HF index as is.
                          aux_layers=None if ids is None else tuple(ids), qk_norm=kind == "qwen3", **options)
    return _build(config, Path(directory), allow_pickle, where, rename=True)


# -- config fields ------------------------------------------------------------------------------------------------

_GENERIC_KEYS = set(PretrainedConfig().to_dict()) | {"torch_dtype", "dtype", "transformers_version", "model_type"}


def _config(directory: Path) -> tuple[dict[str, Any], Path]:
    raw, cfg_path = read_config(directory)
    if not isinstance(raw, dict):
        raise UserError(f"{cfg_path}: expected a JSON object, got {type(raw).__name__}")
    return raw, cfg_path


def _int(raw: dict[str, Any], key: str, where: str, default: int | None = None) -> int:
    value = raw.get(key, default)
    if value is None:
        raise UserError(f"{where}: missing `{key}`")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{where}: `{key}` must be a positive integer, got {value!r}")
    return value


def _bool(raw: dict[str, Any], key: str, where: str) -> bool:
    value = raw.get(key, False)
    if not isinstance(value, bool):
        raise UserError(f"{where}: `{key}` must be true or false, got {value!r}")
    return value


def _layer_ids(raw: dict[str, Any], key: str, where: str) -> list[int] | None:
    ids = raw.get(key)
    if ids is None:
        return None
    if (not isinstance(ids, list) or not ids or len(set(ids)) != len(ids)
            or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids)):
        raise UserError(f"{where}: `{key}` must be a list of distinct non-negative layer ids, got {ids!r}")
    return ids


def _layer(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """The decoder layer's fields, refusing every variant this module does not implement."""
    if raw.get("num_hidden_layers", 1) != 1:
        raise UserError(f"{where}: `num_hidden_layers` {raw['num_hidden_layers']}: only a one-layer EAGLE-3 drafter "
                        "is implemented")
    for key in ("attention_bias", "mlp_bias", "use_sliding_window"):
        if raw.get(key):
            raise UserError(f"{where}: `{key}` is not implemented")
    if raw.get("hidden_act", "silu") != "silu":
        raise UserError(f"{where}: `hidden_act` {raw['hidden_act']!r} is not implemented (silu)")
    if any(t != "full_attention" for t in raw.get("layer_types") or []):
        raise UserError(f"{where}: `layer_types` other than full_attention are not implemented")
    if raw.get("rope_scaling"):
        raise UserError(f"{where}: `rope_scaling` is not implemented (plain rotary embedding only)")
    rope = raw.get("rope_parameters") or {}
    if not isinstance(rope, dict) or rope.get("rope_type", "default") != "default":
        raise UserError(f"{where}: `rope_parameters` other than the default rotary embedding are not implemented")
    theta = raw.get("rope_theta", rope.get("rope_theta", 10000.0))  # the drafter's own; 10000 when absent
    if isinstance(theta, bool) or not isinstance(theta, int | float) or theta <= 0:
        raise UserError(f"{where}: `rope_theta` must be a positive number, got {theta!r}")
    eps = raw.get("rms_norm_eps", 1e-6)
    if isinstance(eps, bool) or not isinstance(eps, int | float) or eps <= 0:
        raise UserError(f"{where}: `rms_norm_eps` must be a positive number, got {eps!r}")
    heads = _int(raw, "num_attention_heads", where)
    kv_heads = _int(raw, "num_key_value_heads", where, heads)
    if heads % kv_heads:
        raise UserError(f"{where}: {heads} attention heads are not a multiple of {kv_heads} KV heads")
    return {"hidden_size": _int(raw, "hidden_size", where), "intermediate_size": _int(raw, "intermediate_size", where),
            "heads": heads, "kv_heads": kv_heads, "vocab_size": _int(raw, "vocab_size", where),
            "rms_norm_eps": float(eps), "rope_theta": float(theta)}


def _speculators_config(sc: Any, where: str) -> None:
    if not isinstance(sc, dict):
        raise UserError(f"{where}: `speculators_config` must be an object")
    if sc.get("algorithm") != "eagle3":
        raise UserError(f"{where}: `speculators_config.algorithm` {sc.get('algorithm')!r} is not eagle3")
    methods = sc.get("proposal_methods")
    if not isinstance(methods, list) or not methods or not all(isinstance(m, dict) for m in methods):
        raise UserError(f"{where}: `speculators_config.proposal_methods` must be a non-empty list of objects")
    verifier = sc.get("verifier")
    if not isinstance(verifier, dict) or not isinstance(verifier.get("architectures", []), list):
        raise UserError(f"{where}: `speculators_config.verifier` must be an object with a list `architectures`")


# -- weights ------------------------------------------------------------------------------------------------------


def _file_name(key: str, rename: bool) -> str:
    return "layers.0." + key[len("midlayer."):] if rename and key.startswith("midlayer.") else key


def _build(config: Eagle3Config, directory: Path, allow_pickle: bool, where: str,
           rename: bool) -> tuple[Eagle3Drafter, Path]:
    state, weights = read_state(directory, allow_pickle)
    config = replace(config, with_embedding="embed_tokens.weight" in state)
    if not config.reduced and ("d2t" in state or "t2d" in state):
        _drop_identity_map(state, config, weights)
    shapes = {_file_name(k, rename): (k, shape) for k, shape in expected_shapes(config).items()}
    for key in shapes:
        if key not in state:
            raise UserError(f"{weights}: missing key `{key}`")
    fmt = "speculators EAGLE-3" if rename else "SafeAILab EAGLE-3"
    for key in state:
        if key not in shapes:
            raise UserError(f"{weights}: unexpected key `{key}` (not part of the {fmt} format with this config)")
    for key, (_, shape) in shapes.items():
        if tuple(state[key].shape) != shape:
            raise UserError(f"{weights}: key `{key}` has shape {tuple(state[key].shape)}, expected {shape} from "
                            f"{Path(where).name}")
    check_finite(state, weights)
    if config.reduced:
        problem = vocab_map_problem(state["d2t"], state["t2d"], config.vocab_size, config.draft_vocab_size)
        if problem:
            raise UserError(f"{weights}: {problem}")
    drafter = Eagle3Drafter(config)
    load_state(drafter, {internal: state[key] for key, (internal, _) in shapes.items()})
    return drafter.eval(), weights


def _drop_identity_map(state: dict[str, Any], config: Eagle3Config, weights: Path) -> None:
    """Same vocabulary: a d2t/t2d pair may only be the identity (zero offsets, every token marked); it is dropped."""
    d2t, t2d = state.pop("d2t", None), state.pop("t2d", None)
    identity = (d2t is not None and t2d is not None and tuple(d2t.shape) == (config.vocab_size,)
                and tuple(t2d.shape) == (config.vocab_size,) and not bool(d2t.any()) and bool(t2d.all()))
    if not identity:
        raise UserError(f"{weights}: draft_vocab_size equals vocab_size ({config.vocab_size}), but `d2t`/`t2d` are "
                        "not the identity map (or only one of them is present)")



def check_eagle3_against_target(drafter: Eagle3Drafter, target_config: Any, name: str) -> None:
    """An EAGLE-3 drafter fits a target when it reads the target's width and vocabulary and the target has the
    layers it taps; one line naming what differs otherwise."""
    c = drafter.config
    vocab, width = int(target_config.vocab_size), int(target_config.hidden_size)
    if c.vocab_size != vocab:
        raise UserError(f"EAGLE-3 drafter {name} is for a vocabulary of {c.vocab_size} tokens, the target has {vocab}")
    if c.target_hidden_size != width:
        raise UserError(f"EAGLE-3 drafter {name} reads target states of width {c.target_hidden_size}, the target's "
                        f"are {width}")
    if drafter.embed_tokens is None and c.hidden_size != width:
        raise UserError(f"EAGLE-3 drafter {name} has no embedding of its own and a width ({c.hidden_size}) other than "
                        f"the target's ({width}), so it cannot use the target's embedding")
    aux_layers_for(c, int(target_config.num_hidden_layers))  # a target with too few layers is refused there


# -- writers (the loaders' inverse) -------------------------------------------------------------------------------

SPECULATORS_VERSION = "0.3.0"  # the release whose eagle3 config layout this writes (and `load_speculators` reads)


def safeailab_problem(config: Eagle3Config) -> str | None:
    """Why the SafeAILab layout cannot express this drafter (it has no field for the option), or None."""
    used = [name for name in ("qk_norm", *SPECULATORS_OPTIONS) if getattr(config, name)]
    if used:
        return (f"it uses {', '.join(used)}, which only the speculators format can express; export it with "
                "--format speculators")
    if config.head_dim != config.hidden_size // config.heads:  # what `load_safeailab` rebuilds it with
        return (f"its head_dim {config.head_dim} is not hidden_size / heads ({config.hidden_size} / {config.heads}), "
                "the only head size SafeAILab's layer has; export it in the speculators format")
    if config.aux_layers is not None and 0 in config.aux_layers:
        # SGLang/SpecForge ids count layer outputs, so the embedding output (HF index 0) has no id there.
        return ("it reads hidden state 0 (the embedding output), which SafeAILab-layout layer ids cannot name; export "
                "it in the speculators format")
    return None


def save_safeailab(drafter: Eagle3Drafter, directory: str | Path, extra_config: dict[str, Any] | None = None) -> Path:
    """Write `drafter` in the SafeAILab EAGLE-3 layout that `load_safeailab` reads back; returns the weights file.

    Refused (UserError, before anything is written) for options the layout has no field for."""
    c = drafter.config
    problem = safeailab_problem(c)
    if problem:
        raise UserError(f"cannot write EAGLE-3 drafter to {directory} in the SafeAILab layout: {problem}")
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", **_layer_fields(c),
        "draft_vocab_size": c.draft_vocab_size, "target_hidden_size": c.target_hidden_size,
        "tie_word_embeddings": False, "torch_dtype": "float32"}
    if c.aux_layers is not None:
        # SGLang/SpecForge ids are layer outputs (state leaving layer i = HF index i + 1); `load_safeailab` adds 1.
        config["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": [i - 1 for i in c.aux_layers],
                                  "use_aux_hidden_state": True}
    config.update(extra_config or {})
    return _write(directory, _state(drafter, rename=False), config)


def save_speculators(drafter: Eagle3Drafter, directory: str | Path, verifier_name: str,
                     verifier_architectures: list[str], speculative_tokens: int = 5) -> Path:
    """Write `drafter` in vllm-project/speculators' eagle3 layout that `load_speculators` reads back (and vLLM
    serves); returns the weights file. The verifier is the target model it was trained for."""
    c = drafter.config
    if isinstance(speculative_tokens, bool) or not isinstance(speculative_tokens, int) or speculative_tokens < 1:
        raise UserError(f"speculative_tokens must be a positive integer, got {speculative_tokens!r}")
    layer = {"model_type": "qwen3" if c.qk_norm else "llama", **_layer_fields(c), "attention_bias": False}
    config: dict[str, Any] = {
        "architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3",
        "speculators_version": SPECULATORS_VERSION,
        "speculators_config": {
            "algorithm": "eagle3", "default_proposal_method": "greedy",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": speculative_tokens,
                                  "verifier_accept_k": 1, "accept_tolerance": 0.0}],
            "verifier": {"name_or_path": verifier_name, "architectures": list(verifier_architectures)}},
        "transformer_layer_config": layer, "draft_vocab_size": c.draft_vocab_size,
        "target_hidden_size": c.target_hidden_size, "embed_requires_grad": False,
        **{name: getattr(c, name) for name in SPECULATORS_OPTIONS}, "torch_dtype": "float32"}
    if c.aux_layers is not None:
        config["eagle_aux_hidden_state_layer_ids"] = list(c.aux_layers)  # vLLM's ids are HF indices as they are
    return _write(directory, _state(drafter, rename=True), config)


def _layer_fields(c: Eagle3Config) -> dict[str, Any]:
    return {"hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size, "num_attention_heads": c.heads,
            "num_key_value_heads": c.kv_heads, "head_dim": c.head_dim, "vocab_size": c.vocab_size,
            "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta, "num_hidden_layers": 1, "hidden_act": "silu"}


def _state(drafter: Eagle3Drafter, rename: bool) -> dict[str, Any]:
    # state_dict holds d2t/t2d only for a reduced vocabulary and never the (non-persistent) rotary frequencies;
    # weights are float32, as config.json's torch_dtype says (and as the loaders return them).
    return {_file_name(k, rename): (v.float() if v.is_floating_point() else v).detach().contiguous().cpu()
            for k, v in drafter.state_dict().items()}


def _write(directory: str | Path, state: dict[str, Any], config: dict[str, Any]) -> Path:
    """Weights first, config.json last, each through a `.part` file: a directory with a config.json is complete."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / "model.safetensors"
    part = weights.with_name(weights.name + ".part")
    try:
        save_file(state, str(part), metadata={"format": "pt"})
        part.replace(weights)
    except OSError as exc:  # a full disk or a read-only directory: the user's to fix
        part.unlink(missing_ok=True)
        raise UserError(f"cannot write {weights}: {exc.strerror or exc}") from None
    except BaseException:  # an interrupt mid-write: no stray .part either
        part.unlink(missing_ok=True)
        raise
    write_atomic(directory / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    return weights
