"""`export-drafter`: a drafter from the model store (or a checkpoint directory) written in a format other tools read.

`--format speculators` writes an EAGLE-3 drafter in vllm-project/speculators' eagle3 layout (what vLLM serves);
`--format eagle` writes an EAGLE-3 drafter in SafeAILab's EAGLE-3 layout and an EAGLE-1/2/HASS drafter in the EAGLE
format. The export is built in a hidden sibling of `--out` and renamed into place, so a failed or interrupted export
leaves nothing behind, and an existing export is never overwritten.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click

from taps_bench.catalog.cards import DrafterCard, TargetCard
from taps_bench.catalog.registry import Registry
from taps_bench.cli.app import Context, cli, quiet_libraries
from taps_bench.errors import UserError, shorten

if TYPE_CHECKING:
    from taps_bench.models.targets import Target

FORMATS = ("speculators", "eagle")
# transformers' class names of the target families taps-bench knows (what speculators' `verifier.architectures`
# names); another family is written with an empty list rather than a guess.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
SPECULATIVE_TOKENS = 5  # speculators' own default chain length; vLLM's --speculative-config can override it


@dataclass
class Exported:
    """What `export_drafter` wrote."""

    name: str
    method: str
    target: str
    format: str  # a description of the layout, as the README says it
    path: Path
    weights_sha256: str


@cli.command("export-drafter")
@click.argument("name", metavar="NAME")
@click.option("--format", "fmt", type=click.Choice(FORMATS), required=True,
              help="speculators: vllm-project/speculators eagle3 (EAGLE-3 drafters); eagle: SafeAILab's EAGLE-3 "
                   "layout for EAGLE-3 drafters, the EAGLE format for EAGLE-1/2/HASS ones.")
@click.option("--out", type=click.Path(), required=True,
              help="The export directory; must not exist yet (or be empty).")
@click.option("--target", default=None, help="The target the drafter is for; default: the machine's default target.")
@click.pass_obj
def export_drafter_cmd(obj: Context, name: str, fmt: str, out: str, target: str | None) -> None:
    """Write the drafter NAME (a name resolved for the target, or a checkpoint directory) in the speculators or
    EAGLE format, with a README.md saying what it is and its card.yaml; the target model is not loaded."""
    quiet_libraries()
    done = export_drafter(obj.registry, name, fmt, Path(out), target)
    click.echo(f"exported drafter '{done.name}' ({done.method}) for {done.target} in the {done.format} to "
               f"{done.path} (weights sha256 {done.weights_sha256})")


def export_drafter(reg: Registry, name: str, fmt: str, out: Path, target: str | None = None) -> Exported:
    """Export `name` for `target` (None: the default target) to `out` (see the module docstring)."""
    from taps_bench.measure.resolve import drafter_location, load_any
    from taps_bench.models.eagle3 import Eagle3Drafter
    from taps_bench.models.eagle3_format import safeailab_problem
    from taps_bench.models.targets import default_target_name

    if fmt not in FORMATS:
        raise UserError(f"--format {shorten(fmt)}: unknown; use one of {', '.join(FORMATS)}")
    check_out(out)
    target_card = reg.target(target if target is not None else default_target_name(reg.cards["target"])[0])
    directory, _, card = drafter_location(reg, name, unloaded(target_card))
    shown = name if card is not None else Path(name).resolve().name
    drafter, _ = load_any(directory)
    if isinstance(drafter, Eagle3Drafter):
        method = "eagle3"
        if fmt == "eagle" and (problem := safeailab_problem(drafter.config)):
            raise UserError(f"drafter {shown} cannot be written in SafeAILab's EAGLE-3 layout: {problem}")
    else:
        method = eagle_method(card, directory)
        if fmt == "speculators":
            raise UserError(f"drafter {shown} is an EAGLE-1/2/HASS drafter; speculators export is for EAGLE-3 "
                            "drafters here: use --format eagle")
    verifier = verifier_name(target_card)
    layout = {"speculators": "speculators format (vllm-project/speculators, eagle3)",
              "eagle": "SafeAILab EAGLE-3 layout" if method == "eagle3" else "EAGLE format (EAGLE-1/2/HASS)"}[fmt]

    def write(into: Path) -> Path:
        from taps_bench.models.drafter import save_drafter
        from taps_bench.models.eagle3_format import save_safeailab, save_speculators

        if isinstance(drafter, Eagle3Drafter):
            weights = (save_speculators(drafter, into, verifier, verifier_architectures(target_card),
                                        SPECULATIVE_TOKENS) if fmt == "speculators" else save_safeailab(drafter, into))
        else:
            weights = save_drafter(drafter, into)
        copy_card(directory, card, into)
        return weights

    path, sha = build_in_place(out, write, lambda sha: readme(shown, method, target_card, verifier, fmt, layout, sha))
    return Exported(name=shown, method=method, target=target_card.name, format=layout, path=path, weights_sha256=sha)


# -- the pieces -----------------------------------------------------------------------------------------------------


def check_out(out: Path) -> None:
    """--out must be new (or an empty directory): an export never mixes with, or replaces, other files."""
    if out.is_dir():
        if any(out.iterdir()):
            raise UserError(f"--out {out} is a directory that is not empty; pass a new path (nothing was written)")
    elif out.exists() or out.is_symlink():
        raise UserError(f"--out {out} exists and is not a directory; pass a new path (nothing was written)")


def unloaded(card: TargetCard) -> Target:
    """A `Target` without a model: resolving where a drafter lives reads only the target's name, and an export must
    not cost loading (or downloading) the target."""
    import torch

    from taps_bench.models.targets import Target

    return Target(card=card, model=None, tokenizer=None, device=torch.device("cpu"), dtype=torch.float32,
                  stop_ids=(), checkpoint="", checkpoint_hash="")


def eagle_method(card: DrafterCard | None, directory: Path) -> str:
    """eagle1, eagle2 or hass as a card says (the registry's, or the card.yaml beside a checkpoint given directly);
    the checkpoint format alone cannot tell them apart."""
    import yaml

    if card is not None:
        return card.method
    with suppress(OSError, UnicodeDecodeError, yaml.YAMLError):
        own = yaml.safe_load((directory / "card.yaml").read_text(encoding="utf-8"))
        if isinstance(own, dict) and own.get("method") in ("eagle1", "eagle2", "hass"):
            return str(own["method"])
    return "eagle1/2/hass (no card says which)"


def verifier_name(card: TargetCard) -> str:
    """What the export names as its verifier: the target's hub id where the card has one (what vLLM loads), else
    the taps-bench target name (a local or wheel checkpoint has no portable name)."""
    for source in (card.source, card.tokenizer):
        if source is not None and source.hub:
            return source.hub
    return card.name


def verifier_architectures(card: TargetCard) -> list[str]:
    return [ARCHITECTURES[card.family]] if card.family in ARCHITECTURES else []


def copy_card(directory: Path, card: DrafterCard | None, into: Path) -> None:
    """The drafter's card.yaml as it is (the model store's carries the training provenance), else the registry's
    card of it; a checkpoint directory without one gets none."""
    import yaml

    if (directory / "card.yaml").is_file():
        shutil.copyfile(directory / "card.yaml", into / "card.yaml")
    elif card is not None:
        (into / "card.yaml").write_text(yaml.safe_dump(card.model_dump(exclude={"origin"}, mode="json"),
                                                       sort_keys=False), encoding="utf-8")


def readme(name: str, method: str, target: TargetCard, verifier: str, fmt: str, layout: str, sha: str) -> str:
    lines = [f"# {name}: {method} drafter for {target.name}", "",
             "Exported by `taps-bench export-drafter`.", "",
             f"- drafter: {name}", f"- method: {method}", f"- target: {target.name}",
             f"- format: {layout}", f"- weights: model.safetensors, sha256 {sha}",
             f"- taps-bench version: {taps_bench_version()}"]
    if fmt == "speculators":
        lines.append(f"- verifier (speculators_config.verifier.name_or_path): {verifier}"
                     + ("" if verifier != target.name else " (the taps-bench target name: the target's card names no "
                        "hub id, so set it to your copy of the target before serving)"))
    lines += ["", f"Read it back with `taps-bench run --drafter DIR --target {target.name}`.", ""]
    return "\n".join(lines)


def taps_bench_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("taps-bench")
    except metadata.PackageNotFoundError:  # a source tree run without installing it
        import taps_bench

        return taps_bench.__version__


def build_in_place(out: Path, write: Callable[[Path], Path], describe: Callable[[str], str]) -> tuple[Path, str]:
    """Run `write(tmp)` (returns the weights file) in a hidden sibling of `out`, add README.md from
    `describe(sha256)`, then rename the sibling to `out`; on any failure remove everything made, parents included."""
    from taps_bench.models.targets import sha256_file

    out = out.absolute()
    missing = [p for p in (out.parent, *out.parent.parents) if not p.exists()]  # deepest first
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {out.parent}: {exc.strerror or exc}") from None
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.part"
    try:
        try:
            tmp.mkdir()
            weights = write(tmp)
            sha = sha256_file(weights)
            (tmp / "README.md").write_text(describe(sha), encoding="utf-8")
        except OSError as exc:  # a full disk, a read-only directory: the user's to fix
            raise UserError(f"cannot write the export into {out.parent}: {exc.strerror or exc}") from None
        try:
            tmp.replace(out)  # replaces an empty directory in one step; refuses one that filled up meanwhile
        except OSError as exc:
            raise UserError(f"cannot move the export into {out}: {exc.strerror or exc}; nothing was written") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in missing:
            with suppress(OSError):
                parent.rmdir()
        raise
    return out, sha
