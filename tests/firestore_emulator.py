"""A Cloud Firestore emulator for tests, on a free 127.0.0.1 port.

    reason = available()          # None, or why the emulator cannot run here
    with running() as emu:        # starts it, waits until it answers, stops it
        FirebaseConfig(emulator_host=emu.address, project_id="demo-x")

The emulator is Google's ``cloud_firestore_emulator`` launcher script (from the
``google-cloud-cli-firestore-emulator`` package, or ``$WABRIDGE_FIRESTORE_EMULATOR``), a bash
script that runs Java 11+ as its child. It is started in its own session, so stopping kills
the whole process group (the script and java). One emulator serves many projects: use a fresh
``project_id`` per test for an empty database. Startup takes about a second on a warm machine.

Clients must use anonymous credentials and set ``NO_GCE_CHECK=true``, so nothing probes the
cloud metadata server.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from harness.net import free_port

ENV = "WABRIDGE_FIRESTORE_EMULATOR"
DEFAULT = Path(
    "/usr/lib/google-cloud-sdk/platform/cloud-firestore-emulator/cloud_firestore_emulator"
)
HOST = "127.0.0.1"


def emulator_path() -> Path:
    return Path(os.environ.get(ENV) or DEFAULT)


def available() -> str | None:
    """None when the emulator can run here, else the reason it cannot."""
    path = emulator_path()
    if not path.is_file():
        return (
            f"Firestore emulator not found at {path} "
            f"(install google-cloud-cli-firestore-emulator or set ${ENV})"
        )
    if not os.access(path, os.X_OK):
        return f"Firestore emulator {path} is not executable"
    jar = path.parent / "cloud-firestore-emulator.jar"
    if not jar.is_file():
        return f"Firestore emulator jar {jar} is missing"
    java = os.environ.get("JAVA") or shutil.which("java")
    if not java:
        return "java not found on PATH (the Firestore emulator needs Java 11 or later)"
    return None


def _answers(port: int) -> bool:
    conn = http.client.HTTPConnection(HOST, port, timeout=1.0)
    try:
        conn.request("GET", "/")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _wait_group(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Reap the launcher, then wait until no process of its group (java) is left."""
    deadline = time.monotonic() + timeout
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return False
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


class Emulator:
    """One emulator process; ``address`` is what ``firebase.emulator_host`` wants."""

    def __init__(self, port: int | None = None, project_id: str = "demo-wabridge") -> None:
        self.port = port or free_port()
        self.project_id = project_id
        self.startup_seconds = 0.0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in stop()
            prefix="firestore-emulator-", suffix=".log", delete=False
        )

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        """The emulator's process (and process group: it leads its own session); 0 if none."""
        return self._proc.pid if self._proc is not None else 0

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        text = Path(self._log.name).read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def start(self, timeout: float = 60.0) -> None:
        """Start (again, on the same port) and wait until it answers HTTP."""
        if self.running:
            return
        started = time.monotonic()
        self._proc = subprocess.Popen(
            [
                str(emulator_path()),
                f"--host={HOST}",
                f"--port={self.port}",
                f"--project_id={self.project_id}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() kills java too
        )
        deadline = started + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise RuntimeError(
                    f"Firestore emulator exited with {code} during startup:\n{self.log_tail()}"
                )
            if _answers(self.port):
                self.startup_seconds = time.monotonic() - started
                return
            time.sleep(0.05)
        self.stop(keep_log=True)
        raise RuntimeError(
            f"Firestore emulator did not answer on {self.address} within {timeout} s:\n"
            f"{self.log_tail()}"
        )

    def stop(self, *, keep_log: bool = True) -> None:
        """Kill the process group (launcher script and java) and reap it."""
        proc, self._proc = self._proc, None
        if proc is not None:
            _signal_group(proc.pid, signal.SIGTERM)
            if not _wait_group(proc, 10.0):
                _signal_group(proc.pid, signal.SIGKILL)
                _wait_group(proc, 10.0)
        if not keep_log:
            self._log.close()
            Path(self._log.name).unlink(missing_ok=True)

    def close(self) -> None:
        self.stop(keep_log=False)


@contextlib.contextmanager
def running(
    port: int | None = None, project_id: str = "demo-wabridge", timeout: float = 60.0
) -> Iterator[Emulator]:
    """A started emulator, stopped (process group killed) on exit."""
    reason = available()
    if reason:
        raise RuntimeError(reason)
    emulator = Emulator(port, project_id)
    try:
        for attempt in range(3):
            try:
                emulator.start(timeout)
                break
            except RuntimeError:
                # the free port may have been taken meanwhile: try another one
                if port is not None or attempt == 2:
                    raise
                emulator.port = free_port()
        yield emulator
    finally:
        emulator.close()
