"""The EAGLE-1/2 / HASS drafter format: saving, strict loading, fitting a target, and resolving names for a target."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_target
from safetensors.torch import load_file, save_file

from taps_bench.catalog.cards import TargetCard
from taps_bench.catalog.proposers import ProposerSpec
from taps_bench.catalog.registry import Registry
from taps_bench.errors import UserError
from taps_bench.measure import resolve
from taps_bench.models.drafter import Drafter, check_against_target, load_drafter, random_drafter, save_drafter
from taps_bench.models.targets import Target

# The key names of the EAGLE checkpoint format (SafeAILab/EAGLE, eagle/model/cnets.py: `fc` and one Llama decoder
# layer without its input_layernorm), which the published HASS drafters share; written out here rather than taken
# from the code under test.
LAYER_KEYS = {
    "layers.0.self_attn.q_proj.weight",
    "layers.0.self_attn.k_proj.weight",
    "layers.0.self_attn.v_proj.weight",
    "layers.0.self_attn.o_proj.weight",
    "layers.0.mlp.gate_proj.weight",
    "layers.0.mlp.up_proj.weight",
    "layers.0.mlp.down_proj.weight",
    "layers.0.post_attention_layernorm.weight",
}
CONFIG_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                 "vocab_size", "rms_norm_eps", "max_position_embeddings", "rope_parameters")

# The published Llama-3-8B-Instruct drafters of the paper (arXiv 2603.27027), by card name.
PUBLISHED = {
    "mathinstruct-hass": ("hass", "zbeeb/Hass-MathInstruct_20epochs", True),
    "mixed-35k-hass": ("hass", "zbeeb/Hass-Sharegpt-Mathinstruct-20epochs", True),
    "mixed-70k-hass": ("hass", "zbeeb/Hass-Sharegpt-Mathinstruct-20epochs-140k", True),
    "averaged-hass": ("hass", "zbeeb/Hass-Averaged-Checkpoint", True),
    "mathinstruct-eagle2": ("eagle2", "zbeeb/Eagle-MathInstruct_20epochs", True),
    "mixed-35k-eagle2": ("eagle2", "zbeeb/Eagle-Sharegpt-Mathinstruct-20epochs", True),
    "mixed-70k-eagle2": ("eagle2", "zbeeb/Eagle-Sharegpt-Mathinstruct-20epochs-140k", True),
    "sharegpt-hass": ("hass", "zbeeb/Hass-ShareGPT_20epochs", False),
    "sharegpt-eagle2": ("eagle2", "zbeeb/Eagle-ShareGPT_20epochs", False),
}
# Drafters the CPU target gets from local training recipes (recipe name == drafter name).
CPU_RECIPES = ("mathinstruct-hass", "mathinstruct-eagle2", "sharegpt-hass", "sharegpt-eagle2", "mixed-hass",
               "mixed-eagle2")


@pytest.fixture(scope="module")
def target_model() -> Any:
    return tiny_target("llama", seed=0)


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry.load()


def state_of(drafter: Drafter) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in drafter.state_for_saving().items()}


def write_checkpoint(directory: Path, state: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def saved(tmp_path: Path, target_model: Any, **kw: Any) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]]:
    """A random drafter for the tiny target saved with save_drafter: (directory, its state, its config.json)."""
    drafter = random_drafter(target_model.config, seed=3, **kw)
    directory = tmp_path / "ckpt"
    save_drafter(drafter, directory)
    return directory, state_of(drafter), json.loads((directory / "config.json").read_text())


def with_embedding(drafter: Drafter, embedding: torch.Tensor) -> Drafter:
    full = Drafter(drafter.config, fc_bias=drafter.fc.bias is not None, with_embedding=True)
    full.load_state_dict({**drafter.state_dict(), "embed_tokens.weight": embedding.detach().clone()})
    return full.eval()


def make_target(model: Any, name: str = "tiny-llama") -> Target:
    card = TargetCard.model_validate({"name": name, "description": "a tiny random test target", "family": "llama",
                                      "source": {"path": "/nonexistent"}})
    return Target(card=card, model=model, tokenizer=None, device=torch.device("cpu"), dtype=torch.float32,
                  stop_ids=(), checkpoint="test", checkpoint_hash="0" * 64)


def forward(drafter: Drafter, seed: int = 0) -> torch.Tensor:
    """One forward over 5 positions with a causal mask (enough to compare two drafters' computations)."""
    gen = torch.Generator().manual_seed(seed)
    h = drafter.config.hidden_size
    embeds, features = torch.randn(5, h, generator=gen), torch.randn(5, h, generator=gen)
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    with torch.no_grad():
        out, _ = drafter(embeds, features, torch.arange(5), None, mask)
    return out


# -- save / load round trip ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fc_bias", [True, False])
def test_save_load_round_trip_is_bit_exact(tmp_path: Path, target_model: Any, fc_bias: bool) -> None:
    original = random_drafter(target_model.config, seed=1, fc_bias=fc_bias)
    weights = save_drafter(original, tmp_path / "d")
    assert weights == tmp_path / "d" / "model.safetensors"
    # Exactly the two files of the format: no temporary files left behind, no pickle.
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["config.json", "model.safetensors"]
    expected_keys = {"fc.weight", *LAYER_KEYS} | ({"fc.bias"} if fc_bias else set())
    assert set(load_file(str(weights))) == expected_keys

    loaded, path = load_drafter(tmp_path / "d")
    assert path == weights
    assert (loaded.fc.bias is not None) is fc_bias
    assert loaded.embed_tokens is None
    mine, theirs = state_of(original), state_of(loaded)
    assert set(mine) == set(theirs) == expected_keys
    for key in mine:
        assert theirs[key].dtype == torch.float32, key
        assert torch.equal(mine[key], theirs[key]), key
    for name in CONFIG_FIELDS:
        assert getattr(loaded.config, name) == getattr(original.config, name), name
    assert loaded.config.num_hidden_layers == 1
    raw = json.loads((tmp_path / "d" / "config.json").read_text())
    assert raw["num_hidden_layers"] == 1 and raw["bias"] is fc_bias
    assert torch.equal(forward(original), forward(loaded))


def test_round_trip_with_embedding(tmp_path: Path, target_model: Any) -> None:
    embedding = target_model.get_input_embeddings().weight
    original = with_embedding(random_drafter(target_model.config, seed=2), embedding)
    save_drafter(original, tmp_path / "d")
    assert set(load_file(str(tmp_path / "d" / "model.safetensors"))) == {"fc.weight", "fc.bias", "embed_tokens.weight",
                                                                          *LAYER_KEYS}
    loaded, _ = load_drafter(tmp_path / "d")
    assert loaded.embed_tokens is not None
    assert torch.equal(loaded.embed_tokens.weight, embedding)
    for key, value in state_of(original).items():
        assert torch.equal(value, state_of(loaded)[key]), key


def test_save_twice_overwrites_cleanly(tmp_path: Path, target_model: Any) -> None:
    save_drafter(random_drafter(target_model.config, seed=1), tmp_path / "d")
    second = random_drafter(target_model.config, seed=2, fc_bias=False)
    save_drafter(second, tmp_path / "d")
    loaded, _ = load_drafter(tmp_path / "d")
    assert loaded.fc.bias is None
    assert torch.equal(loaded.fc.weight, second.fc.weight)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["config.json", "model.safetensors"]


def test_half_precision_checkpoint_loads_as_float32(tmp_path: Path, target_model: Any) -> None:
    directory, state, config = saved(tmp_path, target_model)
    half = {k: v.half() for k, v in state.items()}
    write_checkpoint(directory, half, config)
    loaded, _ = load_drafter(directory)
    for key, value in state_of(loaded).items():
        assert value.dtype == torch.float32
        assert torch.equal(value, half[key].float()), key


def test_published_style_config_loads(tmp_path: Path, target_model: Any) -> None:
    """The config.json the EAGLE/HASS repos ship: top-level rope_theta, torch_dtype, rope_scaling null, bias false."""
    directory, state, _ = saved(tmp_path, target_model)
    c = target_model.config
    config = {"architectures": ["LlamaForCausalLM"], "bias": False, "hidden_act": "silu",
              "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size, "max_position_embeddings": 512,
              "model_type": "llama", "num_attention_heads": c.num_attention_heads,
              "num_key_value_heads": c.num_key_value_heads, "num_hidden_layers": 1, "pretraining_tp": 1,
              "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 500000.0, "tie_word_embeddings": False,
              "torch_dtype": "float16", "transformers_version": "4.28.1", "use_cache": True,
              "vocab_size": c.vocab_size}
    write_checkpoint(directory, state, config)
    loaded, _ = load_drafter(directory)
    assert loaded.config.rope_parameters["rope_theta"] == 500000.0
    assert loaded.config.rms_norm_eps == 1e-05
    assert loaded.fc.bias is not None  # the state dict has fc.bias although the config says bias: false


# -- fc.bias comes from the state dict, not from the config ---------------------------------------------------------


def test_fc_bias_present_although_config_says_false(tmp_path: Path, target_model: Any) -> None:
    directory, state, config = saved(tmp_path, target_model, fc_bias=True)
    write_checkpoint(directory, state, {**config, "bias": False})
    loaded, _ = load_drafter(directory)
    assert loaded.fc.bias is not None
    assert torch.equal(loaded.fc.bias, state["fc.bias"])


def test_fc_bias_absent_although_config_says_true(tmp_path: Path, target_model: Any) -> None:
    directory, state, config = saved(tmp_path, target_model, fc_bias=False)
    assert "fc.bias" not in state
    write_checkpoint(directory, state, {**config, "bias": True})
    loaded, _ = load_drafter(directory)
    assert loaded.fc.bias is None
    assert "fc.bias" not in loaded.state_for_saving()


# -- strict loading -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["fc.weight", "layers.0.mlp.up_proj.weight",
                                 "layers.0.post_attention_layernorm.weight", "layers.0.self_attn.o_proj.weight"])
def test_missing_key_is_named(tmp_path: Path, target_model: Any, key: str) -> None:
    directory, state, config = saved(tmp_path, target_model)
    del state[key]
    write_checkpoint(directory, state, config)
    with pytest.raises(UserError, match="missing key") as err:
        load_drafter(directory)
    assert key in str(err.value)


@pytest.mark.parametrize("key", ["layers.0.input_layernorm.weight", "norm.weight", "lm_head.weight",
                                 "layers.1.mlp.up_proj.weight", "layers.0.self_attn.q_proj.bias"])
def test_unexpected_key_is_named(tmp_path: Path, target_model: Any, key: str) -> None:
    directory, state, config = saved(tmp_path, target_model)
    state[key] = torch.zeros(4)
    write_checkpoint(directory, state, config)
    with pytest.raises(UserError, match="unexpected key") as err:
        load_drafter(directory)
    assert key in str(err.value)


@pytest.mark.parametrize("key", ["fc.weight", "fc.bias", "layers.0.self_attn.k_proj.weight",
                                 "layers.0.mlp.down_proj.weight", "embed_tokens.weight"])
def test_wrong_shape_is_named(tmp_path: Path, target_model: Any, key: str) -> None:
    directory, state, config = saved(tmp_path, target_model)
    if key == "embed_tokens.weight":
        state[key] = torch.zeros(config["vocab_size"] + 1, config["hidden_size"])
    else:
        state[key] = torch.zeros(*(n + 1 for n in state[key].shape))
    write_checkpoint(directory, state, config)
    with pytest.raises(UserError, match="shape") as err:
        load_drafter(directory)
    assert key in str(err.value)


def test_pickle_refused_unless_allowed(tmp_path: Path, target_model: Any) -> None:
    directory, state, _ = saved(tmp_path, target_model)
    (directory / "model.safetensors").unlink()
    torch.save(state, directory / "pytorch_model.bin")
    with pytest.raises(UserError, match="pickle") as err:
        load_drafter(directory)
    assert "pytorch_model.bin" in str(err.value)
    loaded, weights = load_drafter(directory, allow_pickle=True)
    assert weights.name == "pytorch_model.bin"
    for key, value in state_of(loaded).items():
        assert torch.equal(value, state[key]), key


def test_safetensors_preferred_over_pickle(tmp_path: Path, target_model: Any) -> None:
    directory, state, _ = saved(tmp_path, target_model)
    torch.save({k: torch.zeros_like(v) for k, v in state.items()}, directory / "pytorch_model.bin")
    loaded, weights = load_drafter(directory)  # no allow_pickle needed: the pickle is never opened
    assert weights.name == "model.safetensors"
    assert torch.equal(loaded.fc.weight, state["fc.weight"])


_EXECUTED: list[str] = []


def _side_effect(tag: str) -> str:
    _EXECUTED.append(tag)
    return tag


class _CodeRunningPickle:
    """Unpickling this calls _side_effect: what a malicious checkpoint would do."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (_side_effect, ("ran",))


def test_pickle_with_code_is_refused_even_when_allowed(tmp_path: Path, target_model: Any) -> None:
    """allow_pickle loads with weights_only=True: an object that runs code is refused, with one clear error."""
    directory, state, _ = saved(tmp_path, target_model)
    (directory / "model.safetensors").unlink()
    torch.save({**state, "fc.weight": _CodeRunningPickle()}, directory / "pytorch_model.bin")
    _EXECUTED.clear()
    with pytest.raises(Exception) as err:
        load_drafter(directory, allow_pickle=True)
    assert _EXECUTED == []  # nothing ran
    # A UserError, not torch's UnpicklingError: anything else reaches the CLI as a traceback.
    assert isinstance(err.value, UserError), f"{type(err.value).__name__}: {str(err.value)[:120]}"
    assert "pytorch_model.bin" in str(err.value)


def test_no_weights_file(tmp_path: Path, target_model: Any) -> None:
    directory, _, _ = saved(tmp_path, target_model)
    (directory / "model.safetensors").unlink()
    with pytest.raises(UserError, match=r"no model\.safetensors or pytorch_model\.bin"):
        load_drafter(directory)


def test_no_config(tmp_path: Path, target_model: Any) -> None:
    directory, _, _ = saved(tmp_path, target_model)
    (directory / "config.json").unlink()
    with pytest.raises(UserError, match=r"config\.json"):
        load_drafter(directory)


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(UserError):
        load_drafter(tmp_path / "nowhere")


@pytest.mark.parametrize("text, expect", [
    ('{"hidden_size": 64,', "not valid JSON"),
    ("[1, 2]", "config.json"),
    ("{}", "hidden_size"),
    (None, "num_hidden_layers"),  # num_hidden_layers: 2 (filled in below)
])
def test_bad_config_json(tmp_path: Path, target_model: Any, text: str | None, expect: str) -> None:
    directory, _, config = saved(tmp_path, target_model)
    (directory / "config.json").write_text(text if text is not None else json.dumps({**config,
                                                                                     "num_hidden_layers": 2}))
    with pytest.raises(UserError, match=expect):
        load_drafter(directory)


def test_config_field_of_wrong_type(tmp_path: Path, target_model: Any) -> None:
    """A config.json value of the wrong type is the user's file to fix: one UserError naming the file and field."""
    directory, _, config = saved(tmp_path, target_model)
    (directory / "config.json").write_text(json.dumps({**config, "hidden_size": "sixty-four"}))
    # A UserError, not the StrictDataclassFieldValidationError LlamaConfig raises on its own.
    with pytest.raises(UserError) as err:
        load_drafter(directory)
    assert "hidden_size" in str(err.value) and "config.json" in str(err.value)


def test_corrupt_safetensors(tmp_path: Path, target_model: Any) -> None:
    directory, _, _ = saved(tmp_path, target_model)
    (directory / "model.safetensors").write_bytes(b"this is not a safetensors file" * 4)
    # A UserError naming the file, not safetensors' own SafetensorError.
    with pytest.raises(UserError) as err:
        load_drafter(directory)
    assert "model.safetensors" in str(err.value)


# -- fitting the target -------------------------------------------------------------------------------------------


def test_check_against_target_accepts_a_match(target_model: Any) -> None:
    drafter = random_drafter(target_model.config)
    check_against_target(drafter, target_model.config, target_model.get_input_embeddings().weight, "d")
    embedding = target_model.get_input_embeddings().weight
    check_against_target(with_embedding(drafter, embedding), target_model.config, embedding, "d")


def test_check_against_qwen3_target() -> None:
    model = tiny_target("qwen3")
    check_against_target(random_drafter(model.config), model.config, model.get_input_embeddings().weight, "d")


@pytest.mark.parametrize("other, field", [
    (dict(hidden=32), "hidden_size"),
    (dict(vocab=101), "vocab_size"),
])
def test_check_against_target_size_mismatch(target_model: Any, other: dict[str, int], field: str) -> None:
    drafter = random_drafter(tiny_target("llama", **other).config)
    with pytest.raises(UserError, match=field) as err:
        check_against_target(drafter, target_model.config, target_model.get_input_embeddings().weight, "mine")
    assert "mine" in str(err.value)


def test_check_against_target_head_dim_mismatch(target_model: Any) -> None:
    config = copy.deepcopy(target_model.config)
    config.num_attention_heads, config.head_dim = 8, None  # hidden 64 / 8 heads: head_dim 8, the target's is 16
    drafter = random_drafter(config)
    with pytest.raises(UserError, match="head_dim"):
        check_against_target(drafter, target_model.config, target_model.get_input_embeddings().weight, "d")


def test_check_against_target_embedding_differs(target_model: Any) -> None:
    embedding = target_model.get_input_embeddings().weight
    drafter = with_embedding(random_drafter(target_model.config), embedding + 1e-3)
    with pytest.raises(UserError, match="embed_tokens"):
        check_against_target(drafter, target_model.config, embedding, "d")


# -- resolving a drafter for a target -----------------------------------------------------------------------------


def include_dir(tmp_path: Path, source_path: str, target: str = "tiny-llama") -> Path:
    inc = tmp_path / "cards"
    (inc / "drafters").mkdir(parents=True)
    (inc / "drafters" / "x.yaml").write_text(
        f"name: x\ndescription: a test drafter\nmethod: hass\ncorpus: mathinstruct\n"
        f"targets:\n  {target}:\n    source: {{path: {json.dumps(source_path)}}}\n")
    return inc


def test_included_card_resolves_for_target(tmp_path: Path, target_model: Any) -> None:
    directory, state, _ = saved(tmp_path, target_model)
    reg = Registry.load(include=[include_dir(tmp_path, str(directory))])
    resolved = resolve.load_for_target(reg, "x", make_target(target_model))
    assert resolved.name == "x"
    assert resolved.card is not None and resolved.card.name == "x"
    assert resolved.checkpoint == f"path:{directory}"
    assert len(resolved.checkpoint_sha256) == 64
    assert torch.equal(resolved.drafter.fc.weight, state["fc.weight"])


def test_included_card_relative_path_is_relative_to_the_card(tmp_path: Path, target_model: Any) -> None:
    directory, _, _ = saved(tmp_path, target_model)  # tmp_path/ckpt; the card is tmp_path/cards/drafters/x.yaml
    reg = Registry.load(include=[include_dir(tmp_path, "../../ckpt")])
    resolved = resolve.load_for_target(reg, "x", make_target(target_model))
    assert Path(resolved.checkpoint.removeprefix("path:")).resolve() == directory.resolve()


def test_included_card_missing_directory(tmp_path: Path, target_model: Any) -> None:
    reg = Registry.load(include=[include_dir(tmp_path, str(tmp_path / "gone"))])
    with pytest.raises(UserError, match="does not exist"):
        resolve.load_for_target(reg, "x", make_target(target_model))


def test_included_card_drafter_that_does_not_fit(tmp_path: Path, target_model: Any) -> None:
    other = tiny_target("llama", hidden=32)
    save_drafter(random_drafter(other.config), tmp_path / "ckpt")
    reg = Registry.load(include=[include_dir(tmp_path, str(tmp_path / "ckpt"))])
    with pytest.raises(UserError, match="hidden_size"):
        resolve.load_for_target(reg, "x", make_target(target_model))


def test_directory_given_directly(tmp_path: Path, target_model: Any, registry: Registry) -> None:
    directory, _, _ = saved(tmp_path, target_model)
    resolved = resolve.load_for_target(registry, str(directory), make_target(target_model))
    assert resolved.card is None
    assert resolved.name == directory.name
    assert resolved.checkpoint.startswith("path:")


def test_published_cards(registry: Registry) -> None:
    for name, (method, hub, confirmed) in PUBLISHED.items():
        card = registry.drafter(name)
        assert card.method == method, name
        assert card.paper and "2603.27027" in card.paper, name
        assert "\n" not in card.description.strip(), name
        entry = card.targets["llama3-8b-instruct"]
        assert entry.source is not None and entry.source.hub == hub, name
        assert entry.confirmed is confirmed, name
    assert registry.drafter("mixed-35k-hass").corpus == "sharegpt:35k+mathinstruct:35k"
    assert registry.drafter("mathinstruct-eagle2").corpus == "mathinstruct"
    assert registry.drafter("sharegpt-hass").corpus == "sharegpt"
    for name in CPU_RECIPES:
        entry = registry.drafter(name).targets["smollm2-135m-instruct"]
        assert entry.source is None and entry.recipe == name, name
    for name in ("mixed-hass", "mixed-eagle2"):
        card = registry.drafter(name)
        assert set(card.targets) == {"smollm2-135m-instruct"}
        assert card.corpus == "sharegpt+mathinstruct"
    # Every published target entry refers to a target card that exists.
    for card in registry.cards["drafter"].values():
        for target_name in card.targets:
            registry.target(target_name)


def test_hub_source_is_fetched_not_loaded_from_disk(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                    target_model: Any, registry: Registry) -> None:
    """For the paper's target a published name means the hub checkpoint (fetched through fetch_from_hub; no network
    here: the fetch is replaced by one that hands back a local copy)."""
    directory, _, _ = saved(tmp_path, target_model)
    fetched: list[tuple[str, str | None]] = []

    def fake_fetch(repo: str, revision: str | None = None) -> Path:
        fetched.append((repo, revision))
        return directory

    monkeypatch.setattr(resolve, "fetch_from_hub", fake_fetch)
    llama = make_target(target_model, "llama3-8b-instruct")
    path, where, card = resolve.drafter_location(registry, "mathinstruct-hass", llama)
    assert fetched == [("zbeeb/Hass-MathInstruct_20epochs", None)]
    assert path == directory and where == "hub:zbeeb/Hass-MathInstruct_20epochs"
    assert card is not None and card.name == "mathinstruct-hass"
    _, where, _ = resolve.drafter_location(registry, "sharegpt-eagle2", llama)
    assert where.startswith("hub:zbeeb/Eagle-ShareGPT_20epochs") and "unconfirmed" in where
    resolved = resolve.load_for_target(registry, "mixed-70k-eagle2", llama)
    assert fetched[-1] == ("zbeeb/Eagle-Sharegpt-Mathinstruct-20epochs-140k", None)
    assert resolved.checkpoint == "hub:zbeeb/Eagle-Sharegpt-Mathinstruct-20epochs-140k"


def test_drafter_without_entry_for_target(monkeypatch: pytest.MonkeyPatch, target_model: Any,
                                          registry: Registry) -> None:
    monkeypatch.setattr(resolve, "fetch_from_hub", lambda *a, **k: pytest.fail("must not fetch"))
    with pytest.raises(UserError) as err:
        resolve.drafter_location(registry, "averaged-hass", make_target(target_model, "smollm2-135m-instruct"))
    message = str(err.value)
    assert "averaged-hass" in message and "smollm2-135m-instruct" in message and "llama3-8b-instruct" in message
    with pytest.raises(UserError, match="llama3-8b-instruct"):
        resolve.drafter_location(registry, "mixed-35k-eagle2", make_target(target_model, "qwen3-4b"))


def test_recipe_entry_not_built(monkeypatch: pytest.MonkeyPatch, target_model: Any, registry: Registry) -> None:
    monkeypatch.setattr(resolve, "fetch_from_hub", lambda *a, **k: pytest.fail("must not fetch"))
    cpu = make_target(target_model, "smollm2-135m-instruct")
    for name in ("mixed-hass", "mathinstruct-eagle2"):
        with pytest.raises(UserError) as err:  # --no-build
            resolve.check_proposer(registry, ProposerSpec(drafter=name), cpu.card, build=False)
        message = str(err.value)
        assert "not been built yet (--no-build)" in message
        assert f"taps-bench train --recipe {name} --target smollm2-135m-instruct" in message
        # Resolving a name never builds: the unbuilt drafter is refused with the same advice ...
        with pytest.raises(UserError, match=f"train --recipe {name} --target smollm2-135m-instruct"):
            resolve.load_for_target(registry, name, cpu)
        # ... the build is the caller's explicit step, and it needs the corpora.
        _, recipes = resolve.check_proposer(registry, ProposerSpec(drafter=name), cpu.card)
        assert [r.name for r in recipes] == [name]
        with pytest.raises(UserError, match="needs the training data"):
            resolve.build_recipes(registry, recipes, cpu, data_dir=None)


def test_unknown_drafter_name_suggests_close_names(target_model: Any, registry: Registry) -> None:
    with pytest.raises(UserError, match="did you mean") as err:
        resolve.drafter_location(registry, "mathinstruct-has", make_target(target_model))
    assert "mathinstruct-hass" in str(err.value)
