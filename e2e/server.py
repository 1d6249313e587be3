"""An inference server run in its own process group, so that stopping it stops every process it spawned.

vLLM and SGLang start engine / scheduler / detokenizer processes beside the HTTP server; a process left
behind keeps its GPU memory and the next server then fails to start. Starting the server with
``start_new_session=True`` (setsid) puts the whole tree in one process group, which ``stop`` signals at once.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

LOG_TAIL_LINES = 60


class ServerError(RuntimeError):
    """The server did not become healthy; the message ends with the tail of its log."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as error:
        return f"(no log: {error})"
    return "\n".join(text.splitlines()[-lines:])


def http_ok(url: str, timeout_s: float = 5.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


class ServerProcess:
    """One server: ``start`` it, ``wait_healthy``, then ``stop`` (always, e.g. in a ``finally``)."""

    def __init__(self, command: list[str], env: dict[str, str], log_path: Path) -> None:
        self.command = command
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_healthy(self, health_url: str, timeout_s: float, poll_s: float = 2.0) -> float:
        """Seconds until ``health_url`` answered 200. Raises ServerError on exit or timeout, with the log tail."""
        assert self.process is not None, "start() first"
        started = time.monotonic()
        while True:
            code = self.process.poll()
            if code is not None:
                raise ServerError(f"server exited with code {code} before it was healthy; "
                                  f"log {self.log_path}:\n{log_tail(self.log_path)}")
            if http_ok(health_url):
                return time.monotonic() - started
            if time.monotonic() - started > timeout_s:
                raise ServerError(f"server not healthy at {health_url} after {timeout_s:.0f} s; "
                                  f"log {self.log_path}:\n{log_tail(self.log_path)}")
            time.sleep(poll_s)

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM the whole process group, SIGKILL it after ``grace_s``; returns once the group is gone."""
        if self.process is None:
            return
        group = self.process.pid  # the session leader's pid is the group id
        _signal_group(group, signal.SIGTERM)
        if not _wait_group_gone(self.process, group, grace_s):
            _signal_group(group, signal.SIGKILL)
            _wait_group_gone(self.process, group, grace_s)
        self.process = None


def _signal_group(group: int, sig: signal.Signals) -> None:
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        pass


def _wait_group_gone(leader: subprocess.Popen, group: int, timeout_s: float) -> bool:
    """Reap the leader and wait until no live process of the group is left (True) or the time is up (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        leader.poll()
        if not live_group_members(group):
            return True
        time.sleep(0.2)
    return False


def live_group_members(group: int) -> list[int]:
    """Pids in process group ``group`` that are not zombies.

    Zombies are skipped: a child re-parented to a PID 1 that never reaps (common in containers) stays a
    zombie forever, holds no GPU memory, and would otherwise make every stop wait for the full timeout.
    """
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: a signal 0 to the group is the best available test
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return []
        return [group]
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses, so split after the last ')'.
        fields = stat[stat.rindex(")") + 2:].split()
        state, pgrp = fields[0], int(fields[2])
        if pgrp == group and state != "Z":
            members.append(int(entry.name))
    return members
