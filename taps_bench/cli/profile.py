"""`profile`: what verification and drafting cost on this machine, and (with a proposer) the tree `--tree auto`
would choose, with the prediction behind it."""

from __future__ import annotations

import json
from typing import Any

import click

from taps_bench.catalog.proposers import ProposerSpec
from taps_bench.cli.app import Context, cli, err
from taps_bench.cli.decode import _check, _load, _open, _prepared
from taps_bench.cli.options import Decoding, Machine, decoding_options, proposer_options


@cli.command()
@proposer_options
@click.option("--top", type=int, default=10, show_default=True, help="Candidate shapes to print.")
@click.option("--refresh", is_flag=True, help="Measure the device profile again (e.g. after measuring under load).")
@decoding_options
@click.pass_obj
def profile(obj: Context, proposer: ProposerSpec | None, tree: Any, top: int, refresh: bool, decoding: Decoding,
            machine: Machine) -> None:
    """Device profile of the target (verify cost per tree size, measured once and cached per target, device, dtype,
    threads and torch; drafting cost per depth and top-k, cached per kind of drafting too), and with
    --drafter/--combiner the shapes ranked by predicted speedup on the task's calibration prompts."""
    from taps_bench.measure import autotree
    from taps_bench.measure.resolve import cost_model, tree_candidates
    from taps_bench.results.report import format_table

    checked: list[Any] = []
    specs = [proposer] if proposer is not None else []
    session = _open(obj, decoding, machine, check=_check(obj, specs, False, True, checked))
    loaded = _load(session)
    target = loaded.target
    ranked: list[autotree.Candidate] = []
    make, label = cost_model(obj.registry, target, None, session.data_dir)
    prompts = autotree.calibration_prompts(target, session.task, session.data_dir)
    prof = autotree.cached_profile(target, make, label, prompts[0] * 4, log=err, refresh=refresh)
    if proposer is not None:
        _prepared(obj, session, loaded, checked, machine.progress)
        ranked, prof = tree_candidates(obj.registry, checked[0][0], target, session.task, session.data_dir,
                                       session.sampling, log=err)
    click.echo(f"# {target.name}: " + ", ".join(f"{k} {v}" for k, v in prof.key.items() if k != "version"))
    click.echo(format_table([{"tokens": n, "ms": ms, "ratio": ms / prof.one_token_ms}
                             for n, ms in sorted(prof.verify_ms.items())],
                            [("tokens", "tree tokens"), ("ms", "verify ms"), ("ratio", "x one forward")]))
    click.echo(format_table([{"shape": k, "ms": v, "ratio": prof.draft_ratio(*map(int, k.split("/")))}
                             for k, v in sorted(prof.draft_ms.items(), key=lambda kv: tuple(map(int, kv[0].split("/"))))
                             if k.split("/")[0] in ("1", "3", "5", "7")],
                            [("shape", "depth/top_k"), ("ms", "draft ms"), ("ratio", "x one forward")]))
    if ranked:
        rows = [{"tree": f"{c.tree.total_tokens}/{c.tree.depth}/{c.tree.top_k}", "tau": c.tau,
                 "verify": c.verify_ratio, "draft": c.draft_ratio, "speedup": c.speedup} for c in ranked[:top]]
        click.echo(format_table(rows, [("tree", "total/depth/top_k"), ("tau", "predicted tau"),
                                       ("verify", "verify ratio"), ("draft", "draft ratio"),
                                       ("speedup", "predicted speedup")]))
    if machine.json:
        click.echo(json.dumps({"profile": prof.key, "one_token_ms": prof.one_token_ms, "verify_ms": prof.verify_ms,
                               "draft_ms": prof.draft_ms, "draft_one_token_ms": prof.draft_one_token_ms,
                               "ranked": [{"tree": c.tree.model_dump(), "tau": c.tau, "verify_ratio": c.verify_ratio,
                                           "draft_ratio": c.draft_ratio, "speedup": c.speedup}
                                          for c in ranked[:top]]}))
