"""Shared fixtures: a real, throwaway PostgreSQL server for the tests that need one.

The estimator's on-disk schedule cache goes to a temporary folder for the session (set before any
test runs, so subprocesses inherit it): tests never write to the user's ~/.cache.

`postgres_url` is the server (session-scoped): `$AUTOTUNE_TEST_POSTGRES_URL` when set (its role
needs CREATEDB), else a server this fixture starts from the PostgreSQL binaries on the machine
(`scripts/system-deps.sh` installs them) in a temporary directory, on 127.0.0.1 and a free
port, trust authentication, stopped at the end of the session. `postgres_db_url` gives each test
its own fresh, empty database on that server, dropped after the test.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_ENV = "AUTOTUNE_TEST_POSTGRES_URL"

os.environ.setdefault("AUTOTUNE_CACHE_DIR", tempfile.mkdtemp(prefix="autotune-test-cache-"))


def _pg_bindir() -> Path:
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    candidates = sorted(versions, key=lambda p: [int(n) for n in re.findall(r"\d+", p)])
    for bindir in reversed(candidates):
        if (Path(bindir) / "initdb").exists():
            return Path(bindir)
    pytest.fail(
        f"PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in /usr/lib/postgresql/*/bin: "
        f"run scripts/system-deps.sh (as root) to install them, or set {PG_ENV} to a server URL",
        pytrace=False,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_postgres(cmd: list[str]) -> list[str]:
    """The server refuses to run as root: run its tools as the `postgres` user then."""
    if os.geteuid() != 0:
        return cmd
    if shutil.which("runuser"):
        return ["runuser", "-u", "postgres", "--", *cmd]
    return ["su", "postgres", "-c", " ".join(cmd)]


def _run(cmd: list[str], what: str, log: Path | None = None) -> None:
    done = subprocess.run(_as_postgres(cmd), capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        tail = log.read_text()[-2000:] if log and log.exists() else ""
        pytest.fail(f"{what} failed ({done.returncode}): {done.stderr.strip()}\n{tail}", pytrace=False)


def _start_server(root: Path, bindir: Path) -> int:
    if os.geteuid() == 0:
        try:
            shutil.chown(root, "postgres", "postgres")
        except LookupError:
            pytest.fail(
                "running as root, and no `postgres` user to run the server: run scripts/system-deps.sh"
            )
    data, log, port = root / "data", root / "server.log", _free_port()
    initdb = [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"]
    _run([*initdb, "--no-locale", "--no-sync"], "initdb")
    options = (
        f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={root} "
        "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
    )
    _run([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start"],
         "pg_ctl start", log)  # fmt: skip
    return port


@pytest.fixture
def two_nodes(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A real two-node Ray cluster on this machine, one CPU per node; its address."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        yield cluster.address
    finally:
        cluster.shutdown()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL server URL (`postgresql+psycopg://...`), to the server's default database."""
    if os.environ.get(PG_ENV):
        yield os.environ[PG_ENV]
        return
    bindir = _pg_bindir()
    root = Path(tempfile.mkdtemp(prefix="autotune-pg-"))  # not under pytest's tmp: that is 0700 to root
    try:
        port = _start_server(root, bindir)
        try:
            yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
        finally:
            cmd = [str(bindir / "pg_ctl"), "-D", str(root / "data"), "-m", "immediate", "stop"]
            subprocess.run(_as_postgres(cmd), capture_output=True, timeout=60)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _admin_conninfo(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture
def postgres_db_url(postgres_url: str) -> Iterator[str]:
    """A fresh, empty database on the test server, for this test alone; dropped afterwards."""
    import psycopg
    from psycopg import sql
    from sqlalchemy.engine import make_url

    name = f"autotune_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_admin_conninfo(postgres_url), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield (
            make_url(postgres_url)
            .set(drivername="postgresql+psycopg", database=name)
            .render_as_string(hide_password=False)
        )
    finally:
        with psycopg.connect(_admin_conninfo(postgres_url), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
