"""EAGLE-3 drafters: the module, both checkpoint formats read strictly, the vocabulary mapping, and the target taps."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_target
from safetensors.torch import save_file

from taps_bench.decoding.tree import ancestor_mask
from taps_bench.errors import UserError
from taps_bench.models.drafter import random_drafter, save_drafter
from taps_bench.models.eagle3 import (
    Eagle3Config,
    Eagle3Drafter,
    aux_layers_for,
    target_logits,
    target_probs,
    topk_target,
)
from taps_bench.models.eagle3_format import detect_format, load_eagle3
from taps_bench.models.forward import extend, prefill, prepare

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB, DRAFT_VOCAB, H = 50, 20, 32


def make_config(reduced: bool = True, **kw: Any) -> Eagle3Config:
    return Eagle3Config(hidden_size=H, intermediate_size=48, heads=4, kv_heads=2, head_dim=H // 4, vocab_size=VOCAB,
                        draft_vocab_size=DRAFT_VOCAB if reduced else VOCAB, target_hidden_size=H, rms_norm_eps=1e-5,
                        rope_theta=5000.0, **kw)


def random_state(config: Eagle3Config, seed: int = 0) -> dict[str, torch.Tensor]:
    """A drafter's weights in SafeAILab names, random (norm weights near 1), with a random sorted draft vocabulary."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in Eagle3Drafter(config).state_dict().items():
        if key in ("d2t", "t2d"):
            continue
        noise = torch.randn(value.shape, generator=g)
        state[key] = 1.0 + 0.1 * noise if key.endswith("norm.weight") or ".fc_norm." in key else 0.2 * noise
    if config.reduced:
        used = torch.sort(torch.randperm(VOCAB, generator=g)[:DRAFT_VOCAB]).values
        state["d2t"] = used - torch.arange(DRAFT_VOCAB)
        state["t2d"] = torch.zeros(VOCAB, dtype=torch.bool)
        state["t2d"][used] = True
    return state


def layer_json(c: Eagle3Config) -> dict[str, Any]:
    return {"hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size, "num_attention_heads": c.heads,
            "num_key_value_heads": c.kv_heads, "vocab_size": c.vocab_size, "rms_norm_eps": c.rms_norm_eps,
            "rope_theta": c.rope_theta, "num_hidden_layers": 1, "hidden_act": "silu"}


def write_safeailab(directory: Path, c: Eagle3Config, state: dict[str, torch.Tensor], **extra: Any) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **layer_json(c),
              "draft_vocab_size": c.draft_vocab_size, **extra}
    (directory / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    return directory


def write_speculators(directory: Path, c: Eagle3Config, state: dict[str, torch.Tensor], **extra: Any) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3", "speculators_version": "0.3",
              "speculators_config": {"algorithm": "eagle3", "default_proposal_method": "greedy",
                                     "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": 5}],
                                     "verifier": {"name_or_path": "tiny", "architectures": ["LlamaForCausalLM"]}},
              "transformer_layer_config": {"model_type": "qwen3" if c.qk_norm else "llama", **layer_json(c),
                                           "head_dim": c.head_dim},
              "draft_vocab_size": c.draft_vocab_size, "norm_before_residual": c.norm_before_residual,
              "norm_before_fc": c.norm_before_fc, "fc_norm": c.fc_norm, "norm_output": c.norm_output, **extra}
    (directory / "config.json").write_text(json.dumps(config))
    renamed = {("layers.0." + k[9:] if k.startswith("midlayer.") else k): v.contiguous() for k, v in state.items()}
    save_file(renamed, str(directory / "model.safetensors"))
    return directory


def run_two_depths(drafter: Eagle3Drafter, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Depth 1 from target features (fc applied), depth 2 from the drafter's own output (no fc): both logits."""
    g = torch.Generator().manual_seed(seed)
    t = 5
    features = torch.randn(t, 3 * H, generator=g)
    embeds = torch.randn(t, H, generator=g)
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    with torch.no_grad():
        out, kv = drafter(embeds, features, torch.arange(t), None, mask, from_target=True)
        out2, _ = drafter(embeds[-1:], out[-1:], torch.tensor([t]), kv, torch.ones(1, t + 1, dtype=torch.bool),
                          from_target=False)
        return drafter.logits(out), drafter.logits(out2)


# -- both formats -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduced", [True, False], ids=["draft-vocab", "full-vocab"])
@pytest.mark.parametrize("embedding", [False, True], ids=["no-embed", "embed"])
def test_both_formats_load_to_identical_outputs(tmp_path: Path, reduced: bool, embedding: bool) -> None:
    c = make_config(reduced, with_embedding=embedding)
    state = random_state(c)
    a, _ = load_eagle3(write_safeailab(tmp_path / "safe", c, state))
    b, _ = load_eagle3(write_speculators(tmp_path / "spec", c, state))
    assert (a.embed_tokens is not None) == embedding and (a.d2t is not None) == reduced
    assert a.config.rope_theta == 5000.0 and a.config.aux_layers is None
    for x, y in zip(run_two_depths(a), run_two_depths(b), strict=True):
        assert x.shape[-1] == c.draft_vocab_size and torch.equal(x, y)
    if reduced:
        assert torch.equal(a.d2t, state["d2t"]) and torch.equal(b.t2d, state["t2d"])


def test_rope_theta_defaults_to_10000_not_the_targets(tmp_path: Path) -> None:
    c = make_config()
    directory = write_safeailab(tmp_path / "d", c, random_state(c))
    config = json.loads((directory / "config.json").read_text())
    del config["rope_theta"]
    (directory / "config.json").write_text(json.dumps(config))
    assert load_eagle3(directory)[0].config.rope_theta == 10000.0


def test_first_depth_applies_fc_later_depths_do_not() -> None:
    drafter = Eagle3Drafter(make_config())
    drafter.load_state_dict(random_state(make_config()), strict=False)
    features, embeds = torch.randn(3, 3 * H), torch.randn(3, H)
    mask = torch.ones(3, 3, dtype=torch.bool).tril()
    with torch.no_grad():
        a, _ = drafter(embeds, features, torch.arange(3), None, mask, from_target=True)
        b, _ = drafter(embeds, drafter.project(features), torch.arange(3), None, mask, from_target=False)
    assert torch.equal(a, b)


def test_speculators_options_and_qwen3_layer_load(tmp_path: Path) -> None:
    c = make_config(qk_norm=True, fc_norm=True, norm_output=True, norm_before_residual=True)
    state = random_state(c)
    assert "midlayer.self_attn.q_norm.weight" in state and "fc_norm.2.weight" in state
    drafter, _ = load_eagle3(write_speculators(tmp_path / "spec", c, state))
    plain, _ = load_eagle3(write_speculators(tmp_path / "plain", make_config(), random_state(make_config())))
    out = run_two_depths(drafter)
    assert drafter.config.qk_norm and drafter.config.norm_output and torch.isfinite(out[1]).all()
    # norm_output: what is fed back is already normed, and the head reads it without a second norm
    x = torch.randn(2, H)
    assert torch.equal(drafter.logits(x), drafter.lm_head(x).float())
    assert not torch.equal(plain.logits(x), plain.lm_head(x).float())
    c2 = make_config(norm_before_fc=True)
    assert load_eagle3(write_speculators(tmp_path / "nbf", c2, random_state(c2)))[0].input_norm is not None


# -- formats told apart ----------------------------------------------------------------------------------------------


def test_detect_format(tmp_path: Path) -> None:
    target = tiny_target("llama", hidden=32, layers=2, vocab=VOCAB)
    save_drafter(random_drafter(target.config), tmp_path / "eagle")
    c = make_config()
    assert detect_format(tmp_path / "eagle") == "eagle"
    assert detect_format(write_safeailab(tmp_path / "safe", c, random_state(c))) == "eagle3"
    assert detect_format(write_speculators(tmp_path / "spec", c, random_state(c))) == "speculators-eagle3"
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UserError, match="not a drafter format"):
        detect_format(tmp_path / "none")
    with pytest.raises(UserError, match="EAGLE-1/2/HASS drafter"):
        load_eagle3(tmp_path / "eagle")
    write_speculators(tmp_path / "mtp", c, random_state(c), speculators_model_type="mtp")
    with pytest.raises(UserError, match="speculators model type `mtp`"):
        detect_format(tmp_path / "mtp")


# -- strict loading ----------------------------------------------------------------------------------------------

WRITERS = {"safeailab": write_safeailab, "speculators": write_speculators}


def file_key(fmt: str, key: str) -> str:
    return "layers.0." + key[9:] if fmt == "speculators" and key.startswith("midlayer.") else key


@pytest.mark.parametrize("fmt", list(WRITERS))
@pytest.mark.parametrize("key", ["fc.weight", "midlayer.hidden_norm.weight", "midlayer.self_attn.k_proj.weight",
                                 "lm_head.weight", "norm.weight", "d2t", "t2d"])
def test_missing_key_is_named(tmp_path: Path, fmt: str, key: str) -> None:
    c = make_config()
    state = random_state(c)
    del state[key]
    with pytest.raises(UserError, match=f"missing key `{file_key(fmt, key)}`"):
        load_eagle3(WRITERS[fmt](tmp_path / "d", c, state))


@pytest.mark.parametrize("fmt", list(WRITERS))
@pytest.mark.parametrize("key", ["midlayer.extra.weight", "fc.bias", "verifier_lm_head.weight"])
def test_unexpected_key_is_named(tmp_path: Path, fmt: str, key: str) -> None:
    c = make_config()
    state = {**random_state(c), key: torch.zeros(3)}
    with pytest.raises(UserError, match=f"unexpected key `{file_key(fmt, key)}`"):
        load_eagle3(WRITERS[fmt](tmp_path / "d", c, state))


@pytest.mark.parametrize("fmt", list(WRITERS))
@pytest.mark.parametrize("key", ["fc.weight", "midlayer.self_attn.q_proj.weight", "lm_head.weight",
                                 "embed_tokens.weight"])
def test_wrong_shape_is_named(tmp_path: Path, fmt: str, key: str) -> None:
    c = make_config(with_embedding=True)
    state = random_state(c)
    state[key] = torch.zeros(state[key].shape[0] + 1, *state[key].shape[1:])
    with pytest.raises(UserError, match=f"key `{file_key(fmt, key)}` has shape"):
        load_eagle3(WRITERS[fmt](tmp_path / "d", c, state))


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_nan_weights_refused(tmp_path: Path, fmt: str) -> None:
    c = make_config()
    state = random_state(c)
    state["midlayer.mlp.up_proj.weight"][0, 0] = float("nan")
    with pytest.raises(UserError, match=r"up_proj\.weight` holds 1 NaN"):
        load_eagle3(WRITERS[fmt](tmp_path / "d", c, state))


@pytest.mark.parametrize(("extra", "named"), [
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"num_hidden_layers": 2}, "num_hidden_layers"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"head_dim": 16}, "head_dim"),
    ({"eagle_config": {"use_aux_hidden_state": False}}, "eagle_config.use_aux_hidden_state"),
    ({"draft_vocab_size": "many"}, "draft_vocab_size"),
])
def test_safeailab_unimplemented_options_refused(tmp_path: Path, extra: dict[str, Any], named: str) -> None:
    c = make_config()
    with pytest.raises(UserError, match=f"`{named}`"):
        load_eagle3(write_safeailab(tmp_path / "d", c, random_state(c), **extra))


@pytest.mark.parametrize(("extra", "layer", "named"), [
    ({"tree_choices": [1, 2]}, {}, "tree_choices"),
    ({"speculators_config": {"algorithm": "eagle", "proposal_methods": [{}], "verifier": {}}}, {},
     "speculators_config.algorithm"),
    ({"norm_before_fc": True, "fc_norm": True}, {}, "fc_norm"),
    ({"norm_output": "yes"}, {}, "norm_output"),
    ({"eagle_aux_hidden_state_layer_ids": [1, 1, 2]}, {}, "eagle_aux_hidden_state_layer_ids"),
    ({}, {"model_type": "mistral"}, "model_type"),
    ({}, {"attention_bias": True}, "attention_bias"),
    ({}, {"num_hidden_layers": 2}, "num_hidden_layers"),
    ({}, {"layer_types": ["sliding_attention"]}, "layer_types"),
    ({}, {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_parameters"),
])
def test_speculators_unimplemented_options_refused(tmp_path: Path, extra: dict[str, Any], layer: dict[str, Any],
                                                   named: str) -> None:
    c = make_config()
    directory = write_speculators(tmp_path / "d", c, random_state(c), **extra)
    config = json.loads((directory / "config.json").read_text())
    config["transformer_layer_config"].update(layer)
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=f"`{named}`"):
        load_eagle3(directory)


# -- d2t / t2d -----------------------------------------------------------------------------------------------------


def _broken_map(state: dict[str, torch.Tensor], how: str) -> None:
    d2t, t2d = state["d2t"], state["t2d"]
    if how == "outside":
        d2t[-1] = VOCAB  # the last draft index then maps to VOCAB + DRAFT_VOCAB - 1
    elif how == "count":
        t2d[(~t2d).nonzero()[0]] = True  # one more token marked than there are draft indices
    elif how == "duplicate":
        d2t[1] = d2t[0] - 1  # draft index 1 -> the target id of index 0
    elif how == "inconsistent":  # same count, but t2d marks another token than d2t reaches
        t2d[(~t2d).nonzero()[0]] = True
        t2d[int(d2t[0])] = False  # draft index 0 maps to target id d2t[0] (sorted: the smallest marked one)
    elif how == "float":
        state["d2t"] = d2t.float()


@pytest.mark.parametrize(("how", "message"), [
    ("outside", "outside the target vocabulary"), ("count", "marks 21 target tokens, but draft_vocab_size is 20"),
    ("duplicate", "same target id"), ("inconsistent", "which `t2d` does not mark"), ("float", "`d2t` has dtype")])
def test_inconsistent_vocab_map_refused(tmp_path: Path, how: str, message: str) -> None:
    c = make_config()
    state = random_state(c)
    _broken_map(state, how)
    with pytest.raises(UserError, match=message):
        load_eagle3(write_safeailab(tmp_path / "d", c, state))


def test_same_vocabulary_accepts_only_an_identity_map(tmp_path: Path) -> None:
    c = make_config(reduced=False)
    state = {**random_state(c), "d2t": torch.zeros(VOCAB, dtype=torch.long), "t2d": torch.ones(VOCAB, dtype=torch.bool)}
    drafter, _ = load_eagle3(write_safeailab(tmp_path / "ok", c, state))
    assert drafter.d2t is None and drafter.t2d is None
    state["d2t"][3] = 1
    with pytest.raises(UserError, match="not the identity map"):
        load_eagle3(write_safeailab(tmp_path / "bad", c, state))


def test_draft_logits_map_back_to_target_ids() -> None:
    d2t = torch.tensor([0, 2, 2, 5])  # draft 0..3 -> target 0, 3, 4, 8
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    full = target_logits(logits, d2t, 10)
    assert full.shape == (1, 10) and full[0, [0, 3, 4, 8]].tolist() == [1.0, 4.0, 3.0, 2.0]
    assert torch.isinf(full[0, [1, 2, 5, 6, 7, 9]]).all() and (full < 0).sum() == 6
    probs = target_probs(logits.softmax(-1), d2t, 10)
    assert probs[0, [1, 2, 5, 6, 7, 9]].eq(0).all() and torch.allclose(probs.sum(), torch.tensor(1.0))
    values, ids = topk_target(logits, 2, d2t)
    assert ids.tolist() == [[3, 4]] and values.tolist() == [[4.0, 3.0]]
    assert torch.equal(ids, torch.topk(full, 2).indices)
    assert torch.equal(target_logits(logits, None, 4), logits)
    assert topk_target(logits, 1, None)[1].tolist() == [[1]]


# -- which target states: the off-by-one ---------------------------------------------------------------------------


def test_aux_layer_ids_map_to_hf_hidden_state_indices(tmp_path: Path) -> None:
    c = make_config()
    state = random_state(c)
    # speculators: vLLM captures the state entering layer id, so ids are HF hidden_states indices as they are
    spec, _ = load_eagle3(write_speculators(tmp_path / "spec", c, state, eagle_aux_hidden_state_layer_ids=[1, 3, 5]))
    assert aux_layers_for(spec.config, 8) == (1, 3, 5)
    # SGLang/SpecForge (`eagle_config` in a SafeAILab-layout config) count layer outputs: id + 1
    safe, _ = load_eagle3(write_safeailab(tmp_path / "safe", c, state,
                                          eagle_config={"eagle_aux_hidden_state_layer_ids": [1, 3, 5]}))
    assert aux_layers_for(safe.config, 8) == (2, 4, 6)
    # default (SafeAILab): the states entering layers 2, L//2, L-3
    assert aux_layers_for(c, 8) == (2, 4, 5) and aux_layers_for(c, 32) == (2, 16, 29)
    with pytest.raises(UserError, match="at least 7"):
        aux_layers_for(c, 6)
    with pytest.raises(UserError, match=r"layer\(s\) \[6\]"):
        aux_layers_for(replace(c, aux_layers=(1, 6)), 6)
    wide = replace(c, aux_layers=(0, 1, 2, 3))
    assert Eagle3Drafter(wide).fc.weight.shape == (H, 4 * H)


# -- target taps --------------------------------------------------------------------------------------------------

TAPS = (0, 3, 1)  # any order, the embedding output included


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_prefill_taps_equal_transformers_hidden_states(family: str) -> None:
    model = tiny_target(family, vocab=97, hidden=64, layers=4)
    w = prepare(model)
    ids = torch.randint(0, 97, (11,), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = model(ids[None], output_hidden_states=True).hidden_states
        hidden, logits, taps = prefill(w, ids, w.new_cache(16), TAPS)
        plain = prefill(w, ids, w.new_cache(16))
    assert len(plain) == 2 and torch.equal(plain[0], hidden) and torch.equal(plain[1], logits)
    assert len(taps) == len(TAPS)
    for index, tapped in zip(TAPS, taps, strict=True):
        torch.testing.assert_close(tapped, ref[index][0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_tree_extend_taps_equal_transformers_hidden_states(family: str) -> None:
    model = tiny_target(family, vocab=97, hidden=64, layers=4)
    w = prepare(model)
    g = torch.Generator().manual_seed(1)
    prompt, nodes = torch.randint(0, 97, (9,), generator=g), torch.randint(0, 97, (5,), generator=g)
    parents = torch.tensor([-1, 0, 0, 1, 3])  # paths: 0; 0-1; 0-2; 0-1-3; 0-1-3-4
    depths = torch.tensor([0, 1, 1, 2, 3])
    paths = [[0], [0, 1], [0, 2], [0, 1, 3], [0, 1, 3, 4]]
    with torch.inference_mode():
        cache = w.new_cache(32)
        prefill(w, prompt, cache)
        _, _, taps = extend(w, nodes, depths, ancestor_mask(parents), cache, prompt.numel(), TAPS)
        for node, path in enumerate(paths):
            ref = model(torch.cat([prompt, nodes[path]])[None], output_hidden_states=True).hidden_states
            for index, tapped in zip(TAPS, taps, strict=True):
                torch.testing.assert_close(tapped[node], ref[index][0, -1], rtol=1e-4, atol=1e-4)


def test_tap_outside_the_target_is_an_error() -> None:
    model = tiny_target("llama", vocab=97, hidden=64, layers=2)
    w = prepare(model)
    # index 2 (= L) is the post-norm last hidden state, as in HF; 3 is outside
    with pytest.raises(ValueError, match=r"layers 0\.\.1"), torch.inference_mode():
        prefill(w, torch.tensor([1, 2]), None, (3,))
