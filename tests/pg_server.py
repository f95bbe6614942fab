"""Throwaway PostgreSQL server for the test suite.

``start_or_connect()`` returns a :class:`PgServer`:

* if ``BILLING_TEST_PG_URL`` is set, it points at that existing server (the URL's
  database, ``postgres`` by default, is used as the maintenance database);
* otherwise it runs ``initdb`` and ``pg_ctl`` (PostgreSQL 15) to start a private
  server in a temporary directory, listening on 127.0.0.1 on a free port and on a
  Unix socket in that directory, with durability switched off for speed.

PostgreSQL refuses to run as root. When the tests run as root the server
binaries are run as the unprivileged user named by ``BILLING_PG_USER``
(default ``billing-ci``; ``.ci/run`` creates it). The user is never created here.

Any problem starting or reaching the server is raised as :class:`PgServerError`;
the conftest decides whether that fails the run or skips PostgreSQL tests.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql
from sqlalchemy.engine import URL, make_url

PG_MAJOR = 15
DEFAULT_BINDIR = Path(f"/usr/lib/postgresql/{PG_MAJOR}/bin")
DEFAULT_ROOT_USER = "billing-ci"
ENV_URL = "BILLING_TEST_PG_URL"
ENV_USER = "BILLING_PG_USER"
SUPERUSER = "postgres"
MAINTENANCE_DB = "postgres"
SQLALCHEMY_DRIVER = "postgresql+psycopg"

START_TIMEOUT_S = 60
START_ATTEMPTS = 3
CONNECT_TIMEOUT_S = 10

SERVER_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "fsync": "off",
    "full_page_writes": "off",
    "synchronous_commit": "off",
    "max_connections": "100",
}


class PgServerError(RuntimeError):
    """The PostgreSQL test server could not be started or reached."""


def env_flag(name: str) -> bool:
    """True when the environment variable holds a true-ish value (1, true, yes, on)."""
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on", "y"}


def find_bindir() -> Path:
    """Directory holding ``initdb`` and ``pg_ctl``: the PostgreSQL 15 one if present,
    else what ``pg_config --bindir`` says, else wherever ``initdb`` is on PATH."""
    candidates = [DEFAULT_BINDIR]
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()
            if out:
                candidates.append(Path(out))
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)
    for candidate in candidates:
        if (candidate / "initdb").is_file() and (candidate / "pg_ctl").is_file():
            return candidate
    raise PgServerError(
        f"initdb/pg_ctl not found (looked in {DEFAULT_BINDIR}, `pg_config --bindir`, PATH); "
        f"install postgresql-{PG_MAJOR} or set {ENV_URL}"
    )


def server_os_user() -> str | None:
    """OS user to run the server as, or None to run it as the current user."""
    if os.geteuid() != 0:
        return None
    return os.environ.get(ENV_USER) or DEFAULT_ROOT_USER


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class LocalCluster:
    """A PostgreSQL data directory in a temporary folder and the server running on it."""

    bindir: Path
    os_user: str | None
    base_dir: Path | None = None
    port: int | None = None
    _running: bool = field(default=False, repr=False)

    @property
    def data_dir(self) -> Path:
        assert self.base_dir is not None
        return self.base_dir / "data"

    @property
    def log_file(self) -> Path:
        assert self.base_dir is not None
        return self.base_dir / "server.log"

    def _prefix(self) -> list[str]:
        if self.os_user is None:
            return []
        if shutil.which("runuser"):
            return ["runuser", "-u", self.os_user, "--"]
        if shutil.which("setpriv"):
            entry = pwd.getpwnam(self.os_user)
            return [
                "setpriv",
                f"--reuid={entry.pw_uid}",
                f"--regid={entry.pw_gid}",
                "--init-groups",
                "--",
            ]
        raise PgServerError("running as root but neither runuser nor setpriv is available")

    def _run(self, args: list[str], what: str) -> None:
        cmd = [*self._prefix(), *args]
        try:
            proc = subprocess.run(
                cmd,
                cwd=self.base_dir,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=START_TIMEOUT_S + 30,
                check=False,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise PgServerError(f"{what} failed to run: {exc}") from exc
        if proc.returncode != 0:
            output = (proc.stdout + proc.stderr).strip()
            log = _tail(self.log_file)
            raise PgServerError(
                f"{what} exited with {proc.returncode}: {output}"
                + (f"\n--- server log ---\n{log}" if log else "")
            )

    def start(self) -> None:
        owner = None
        if self.os_user is not None:
            try:
                owner = pwd.getpwnam(self.os_user)
            except KeyError:
                raise PgServerError(
                    f"tests run as root, so the server must run as an unprivileged user, "
                    f"but user {self.os_user!r} does not exist; create it "
                    f"(`useradd --system --no-create-home {self.os_user}`, as .ci/run does) "
                    f"or name another one in {ENV_USER}"
                ) from None

        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        self.base_dir = Path(tempfile.mkdtemp(prefix=f"billing-pg-{worker}-"))
        atexit.register(self.stop)
        self.base_dir.chmod(0o700)
        if owner is not None:
            os.chown(self.base_dir, owner.pw_uid, owner.pw_gid)

        self._run(
            [
                str(self.bindir / "initdb"),
                "--pgdata",
                str(self.data_dir),
                "--username",
                SUPERUSER,
                "--auth",
                "trust",
                "--encoding",
                "UTF8",
                "--locale",
                "C",
                "--no-sync",
                "--no-instructions",
            ],
            "initdb",
        )
        settings = {**SERVER_SETTINGS, "unix_socket_directories": f"'{self.base_dir}'"}
        # Appending keeps the file's owner (the server user).
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\n# test-suite settings\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())

        last_error: PgServerError | None = None
        for _ in range(START_ATTEMPTS):
            port = free_port()
            try:
                self._run(
                    [
                        str(self.bindir / "pg_ctl"),
                        "--pgdata",
                        str(self.data_dir),
                        "--log",
                        str(self.log_file),
                        "--options",
                        f"-p {port}",
                        "--wait",
                        "--timeout",
                        str(START_TIMEOUT_S),
                        "start",
                    ],
                    "pg_ctl start",
                )
            except PgServerError as exc:
                # Most likely another process took the port between probe and bind.
                last_error = exc
                continue
            self.port = port
            self._running = True
            return
        raise last_error or PgServerError("pg_ctl start failed")

    def stop(self) -> None:
        if self._running:
            self._running = False
            for mode in ("fast", "immediate"):
                try:
                    self._run(
                        [
                            str(self.bindir / "pg_ctl"),
                            "--pgdata",
                            str(self.data_dir),
                            "--mode",
                            mode,
                            "--wait",
                            "stop",
                        ],
                        "pg_ctl stop",
                    )
                    break
                except PgServerError:
                    continue
        if self.base_dir is not None:
            shutil.rmtree(self.base_dir, ignore_errors=True)
            self.base_dir = None


@dataclass
class PgServer:
    """A reachable PostgreSQL server: its maintenance-database URL and helpers for
    per-test databases. ``cluster`` is set when this session started the server."""

    admin_url: URL
    cluster: LocalCluster | None = None

    @property
    def host(self) -> str | None:
        return self.admin_url.host

    @property
    def port(self) -> int | None:
        return self.admin_url.port

    def url(self, database: str | None = None) -> str:
        """SQLAlchemy URL (``postgresql+psycopg://...``) for ``database``."""
        url = self.admin_url if database is None else self.admin_url.set(database=database)
        return url.render_as_string(hide_password=False)

    def conninfo(self, database: str | None = None) -> str:
        """libpq URI (``postgresql://...``) for ``database``, for psycopg.connect()."""
        url = self.admin_url if database is None else self.admin_url.set(database=database)
        return url.set(drivername="postgresql").render_as_string(hide_password=False)

    def admin_connection(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(self.conninfo(), autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)

    def server_version_num(self) -> int:
        with self.admin_connection() as conn:
            row = conn.execute("SHOW server_version_num").fetchone()
        assert row is not None
        return int(str(row[0]))

    def create_database(self) -> str:
        """Create an empty database with a unique name and return the name."""
        name = f"t_{uuid.uuid4().hex}"
        with self.admin_connection() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return name

    def drop_database(self, name: str) -> None:
        """Drop a database, disconnecting anything still connected to it."""
        with self.admin_connection() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()


def _check_reachable(server: PgServer) -> None:
    try:
        with server.admin_connection() as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        raise PgServerError(f"cannot connect to {server.url()}: {exc}") from exc


def start_or_connect() -> PgServer:
    """The server named by BILLING_TEST_PG_URL, or a freshly started private one."""
    external = os.environ.get(ENV_URL, "").strip()
    if external:
        try:
            url = make_url(external)
        except Exception as exc:
            raise PgServerError(f"{ENV_URL} is not a valid database URL: {exc}") from exc
        url = url.set(drivername=SQLALCHEMY_DRIVER, database=url.database or MAINTENANCE_DB)
        server = PgServer(admin_url=url)
        _check_reachable(server)
        return server

    cluster = LocalCluster(bindir=find_bindir(), os_user=server_os_user())
    try:
        cluster.start()
        assert cluster.port is not None
        server = PgServer(
            admin_url=URL.create(
                SQLALCHEMY_DRIVER,
                username=SUPERUSER,
                host="127.0.0.1",
                port=cluster.port,
                database=MAINTENANCE_DB,
            ),
            cluster=cluster,
        )
        _check_reachable(server)
    except BaseException:
        cluster.stop()
        raise
    return server
