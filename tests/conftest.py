"""Shared fixtures: small random targets of the Llama and Qwen3 architectures, built in the tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("TAPS_BENCH_DATA") or REPO.parent / "shared" / "data")

torch.set_num_threads(min(2, torch.get_num_threads()))

# The developer's TAPS_BENCH_HOME, read before any test changes it: its target cache (models/, wheels/) is shared
# with the tests so that SmolLM2 is not downloaded and dequantised again.
_DEVELOPER_HOME = os.environ.get("TAPS_BENCH_HOME")


@pytest.fixture(scope="session")
def shared_home(tmp_path_factory) -> Path:
    home = Path(_DEVELOPER_HOME) if _DEVELOPER_HOME else tmp_path_factory.getbasetemp() / "shared-home"
    for sub in ("models", "wheels"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    return home


def tiny_target(family: str = "llama", seed: int = 0, vocab: int = 97, hidden: int = 64, layers: int = 2,
                heads: int = 4, kv_heads: int = 2, std: float = 0.5):
    """A random causal LM whose logits are spread enough that greedy argmax has no near-ties."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                  tie_word_embeddings=False, initializer_range=std, attn_implementation="sdpa")
    config = LlamaConfig(**common) if family == "llama" else Qwen3Config(head_dim=hidden // heads, **common)
    model = AutoModelForCausalLM.from_config(config)
    return model.eval()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models are all overhead: one thread is several times faster than two on a busy 2-core machine.
    Modules of tiny-model tests opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"shared data not found at {DATA}; set TAPS_BENCH_DATA")
    return DATA


@pytest.fixture(scope="session")
def smollm(shared_home):
    """The real CPU target, loaded once per session from the shared model cache (see `isolated_home`)."""
    from taps_bench.catalog.registry import Registry
    from taps_bench.models.targets import load_target

    old = os.environ.get("TAPS_BENCH_HOME")
    os.environ["TAPS_BENCH_HOME"] = str(shared_home)
    try:
        return load_target(Registry.load().target("smollm2-135m-instruct"))
    finally:
        if old is None:
            del os.environ["TAPS_BENCH_HOME"]
        else:
            os.environ["TAPS_BENCH_HOME"] = old


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory, monkeypatch, shared_home):
    """Every test gets its own TAPS_BENCH_HOME (model store, features, default database), so drafters built on the
    developer's machine never leak into a test. The expensive target cache (models/, wheels/) is shared: it is the
    developer's own when TAPS_BENCH_HOME is set, else one per test session."""
    home = tmp_path_factory.mktemp("home")
    for sub in ("models", "wheels"):
        (home / sub).symlink_to(shared_home / sub, target_is_directory=True)
    monkeypatch.setenv("TAPS_BENCH_HOME", str(home))
    monkeypatch.delenv("TAPS_BENCH_DB", raising=False)
    return home


@pytest.fixture(scope="session")
def tiny_smol(smollm, tmp_path_factory) -> Path:
    """An include directory with target `tiny-smol`: a random 2-layer Llama with SmolLM2's tokenizer and chat
    template, so that whole CLI flows (matrix, submit, leaderboard) run on real prompts in seconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tiny-smol")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=smollm.model.config.vocab_size, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, tie_word_embeddings=False, initializer_range=0.5,
                         bos_token_id=smollm.model.config.bos_token_id, eos_token_id=smollm.model.config.eos_token_id)
    LlamaForCausalLM(config).eval().save_pretrained(root / "model")
    smollm.tokenizer.save_pretrained(root / "model")
    (root / "targets").mkdir()
    (root / "targets" / "tiny-smol.yaml").write_text(
        "name: tiny-smol\ndescription: a random 2-layer Llama with the SmolLM2 tokenizer (tests only)\n"
        f"family: llama\nsource: {{path: {root / 'model'}}}\nsystem_prompt: null\nstop_tokens: ['<|im_end|>']\n"
        "tree: {total_tokens: 8, depth: 2, top_k: 3}\nlicense: Apache-2.0\n")
    return root


# ------------------------------------------------------------------------------------------------ PostgreSQL server

def _postgres_bin() -> Path:
    """The directory of initdb/pg_ctl, installing Debian's `postgresql` first when it is missing and we are root."""
    import shutil
    import subprocess

    def found() -> Path | None:
        dirs = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda d: int(d.parent.name), reverse=True)
        return next((d for d in dirs if (d / "initdb").is_file() and (d / "pg_ctl").is_file()), None)

    if (bindir := found()) is not None:
        return bindir
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin) and cannot be installed (not root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "--no-install-recommends",
                                               "postgresql"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            pytest.skip(f"cannot install PostgreSQL: {' '.join(cmd)} failed: {done.stderr.strip()[-200:]}")
    if (bindir := found()) is None:
        pytest.skip("apt-get installed postgresql but no /usr/lib/postgresql/*/bin/initdb appeared")
    return bindir


@pytest.fixture(scope="session")
def postgres_url():
    """A real PostgreSQL server for this test session, on a free 127.0.0.1 port with a temporary data directory and
    trust authentication; yields the SQLAlchemy URL of database `taps_bench` (user `postgres`) and stops the server
    at the end. initdb refuses to run as root, so as root the server runs as the `postgres` system user."""
    import shutil
    import socket
    import subprocess
    import tempfile

    bindir = _postgres_bin()
    as_user: list[str] = []
    owner: tuple[int, int] | None = None
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            pytest.skip("running as root and `runuser` is missing, so PostgreSQL cannot run as the postgres user")
        try:
            import pwd

            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run PostgreSQL as")
        as_user, owner = ["runuser", "-u", "postgres", "--"], (pw.pw_uid, pw.pw_gid)
    # Not under pytest's tmp_path: its directories are private to root, and the server's user must reach its own.
    root = Path(tempfile.mkdtemp(prefix="taps-bench-pg-"))
    data, sockets, log = root / "data", root / "sockets", root / "server.log"
    sockets.mkdir()
    if owner is not None:
        for path in (root, sockets):
            os.chown(path, *owner)

    def run(*args: str, timeout: float = 120) -> None:
        done = subprocess.run([*as_user, *args], capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            tail = log.read_text()[-1000:] if log.exists() else ""
            raise RuntimeError(f"{' '.join(args)} failed: {done.stdout}{done.stderr}{tail}")

    with socket.socket() as s:  # a free port; another process taking it before the server does is unlikely
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--encoding=UTF8",
        "--locale=C", "--no-sync")
    # fsync off: a test server need not survive a power cut, and the machine is busy enough already.
    options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
    try:
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "120", "start")
        server = f"postgresql+psycopg://postgres@127.0.0.1:{port}"
        _create_database(server, "taps_bench")
        yield f"{server}/taps_bench"
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                           capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


def _create_database(server: str, name: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(f"{server}/postgres", isolation_level="AUTOCOMMIT")  # CREATE DATABASE refuses a transaction
    try:
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()


_pg_databases = iter(range(1, 1_000_000))  # test_1, test_2, ...: one fresh database per test


@pytest.fixture
def fresh_postgres_url(postgres_url: str) -> str:
    """The URL of a new, empty database `test_<n>` on the session's PostgreSQL server."""
    server = postgres_url.rsplit("/", 1)[0]
    name = f"test_{next(_pg_databases)}"
    _create_database(server, name)
    return f"{server}/{name}"
