"""Provenance recorded with every run: versions, commit, machine, threads."""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from taps_bench.models.targets import Target
from taps_bench.paths import PACKAGE_DIR


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """The commit of the taps-bench checkout in use (with "+dirty" when it has uncommitted changes)."""
    repo = PACKAGE_DIR.parent
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (sha + ("+dirty" if dirty else "")) if sha else None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def collect(target: Target) -> dict[str, Any]:
    return {
        "versions": {p: _version(p) for p in ("taps-bench", "torch", "transformers", "safetensors", "sqlalchemy")}
        | {"python": platform.python_version()},
        "git_commit": git_commit(),
        "device": str(target.device),
        "device_name": device_name(target.device),
        "dtype": str(target.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "target_checkpoint": target.checkpoint,
        "target_checkpoint_sha256": target.checkpoint_hash,
        # What "full" means in the leaderboard's draft-vocabulary column (provenance, so stored runs still match).
        "target_vocab_size": int(target.model.config.vocab_size) if target.model is not None else None,
    }
