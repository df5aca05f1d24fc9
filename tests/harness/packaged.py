"""wabridge installed from its Debian package into a private systemd, as an administrator would.

``PackagedHost`` boots a :class:`~harness.systemd_ns.SystemdNamespace` that holds nothing of the
repository or of a development venv: only the directory with the built ``.deb`` files is bound
in (read-only), and ``dpkg -i`` installs one inside, so the maintainer scripts run against a real
systemd (``[ -d /run/systemd/system ]`` holds there). Writes go to the namespace's overlay, in
RAM; the host's dpkg database and disk are never touched.

Configuration given to the constructor (``config``, ``worker_env``, ``controller_env``,
``files``) is written before the package is installed, so the controller that ``postinst``
starts already runs with it; ``dpkg`` keeps such a pre-existing conffile (``--force-confold``)
and leaves the packaged one beside it as ``wabridge.toml.dpkg-dist``.

Used by ``tests/test_package.py`` and by ``packaging/run_local.py`` (``make run``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .systemd_ns import Bind, SystemdNamespace
from .wait import wait_until

REPO = Path(__file__).resolve().parents[2]
BUILD_DEB = REPO / "packaging" / "build-deb"
DEB_DIR = "/var/cache/wabridge-debs"  # where the .deb directory appears inside
VENV = "/usr/lib/wabridge/venv"
CONTROLLER = "wabridge-controller.service"
STATE_DB = "/var/lib/wabridge/control/control.db"

Config = str | Mapping[str, Mapping[str, Any]]
_OURS = re.compile(r"(^|/)(wabridge-controller|wabridge-worker|wabridge-sim|wabridgectl)\b")


def deb_tools_missing() -> str | None:
    """None if packages can be built here, else why not."""
    for tool in ("dpkg-deb", "dpkg-shlibdeps", "xz"):
        if shutil.which(tool) is None:
            return f"'{tool}' not found (apt-get install dpkg-dev xz-utils)"
    if not Path("/usr/bin/python3").exists():
        return "/usr/bin/python3 not found"
    return None


def build_deb(out: Path, *, version: str | None = None, level: int | None = None) -> Path:
    """Run ``packaging/build-deb`` (a no-op when the package is up to date); return the .deb."""
    argv = [str(BUILD_DEB), "--out", str(out)]
    if version:
        argv += ["--version", version]
    if level is not None:
        argv += ["--level", str(level)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=1800, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"build-deb failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    built = re.findall(r"(?:built|up to date:) (\S+\.deb)", r.stdout)
    if not built:
        raise RuntimeError(f"build-deb named no package:\n{r.stdout}\n{r.stderr}")
    return Path(built[-1])


def upstream_version() -> str:
    import tomllib  # noqa: PLC0415

    with (REPO / "pyproject.toml").open("rb") as f:
        return str(tomllib.load(f)["project"]["version"])


def render_toml(sections: Mapping[str, Mapping[str, Any]]) -> str:
    """Flat TOML sections of str, bool, int and float values (a JSON string is a TOML string)."""
    out = []
    for name, values in sections.items():
        out.append(f"[{name}]")
        out += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    return "\n".join(out) + "\n"


def sim_config(port: int) -> dict[str, dict[str, Any]]:
    """Workers on the simulator (``wabridge-sim.service`` inside, on the shared 127.0.0.1)."""
    return {
        "controller": {"metrics_listen": ""},
        "worker": {"backend": "sim", "sim_url": f"http://127.0.0.1:{port}"},
        "sim": {"listen": f"127.0.0.1:{port}"},
    }


class PackagedHost:
    """A private systemd with wabridge installed from a .deb; use as a context manager.

    ``deb`` is installed on entry unless ``install=False``; every .deb in its directory can be
    installed later (``install(path)``), e.g. a newer version for the upgrade path.
    """

    def __init__(
        self,
        deb: Path,
        *,
        config: Config | None = None,
        worker_env: str | None = None,
        controller_env: str | None = None,
        files: Mapping[str, str] | None = None,
        file_modes: Mapping[str, int] | None = None,
        install: bool = True,
    ) -> None:
        self.deb = Path(deb).resolve()
        written: dict[str, str] = dict(files or {})
        modes: dict[str, int] = dict(file_modes or {})
        if config is not None:
            written["/etc/wabridge/wabridge.toml"] = (
                config if isinstance(config, str) else render_toml(config)
            )
        if worker_env is not None:
            written["/etc/wabridge/worker.env"] = worker_env
            modes.setdefault("/etc/wabridge/worker.env", 0o600)
        if controller_env is not None:
            written["/etc/wabridge/controller.env"] = controller_env
            modes.setdefault("/etc/wabridge/controller.env", 0o600)
        self._install_on_enter = install
        self.ns = SystemdNamespace(
            binds=[Bind(self.deb.parent, DEB_DIR)], files=written, file_modes=modes
        )

    # --- lifecycle ------------------------------------------------------------------------
    def __enter__(self) -> PackagedHost:
        self.ns.start()
        try:
            if self._install_on_enter:
                self.install(self.deb)
        except BaseException:
            self.ns.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.ns.stop()

    @property
    def pid(self) -> int:
        return self.ns.pid

    # --- dpkg -----------------------------------------------------------------------------
    def dpkg(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        r = self.ns.run(
            ["dpkg", "--force-confdef", "--force-confold", *args], timeout=timeout
        )
        if r.returncode != 0:
            raise AssertionError(
                f"dpkg {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}\n"
                f"--- journal ---\n{self.ns.journalctl('-n', '60')}"
            )
        return r

    def install(self, deb: Path) -> subprocess.CompletedProcess[str]:
        deb = Path(deb).resolve()
        if deb.parent != self.deb.parent:
            raise ValueError(f"{deb} is not in {self.deb.parent}, the directory bound in")
        return self.dpkg("-i", f"{DEB_DIR}/{deb.name}")

    def remove(self, *, purge: bool = False) -> subprocess.CompletedProcess[str]:
        return self.dpkg("--purge" if purge else "--remove", "wabridge")

    def version(self) -> str:
        r = self.ns.run(["dpkg-query", "-W", "-f=${Version} ${db:Status-Abbrev}", "wabridge"])
        return r.stdout.strip() if r.returncode == 0 else ""

    # --- systemd --------------------------------------------------------------------------
    def prop(self, unit: str, name: str) -> str:
        return self.ns.unit_property(unit, name)

    def wait_state(self, unit: str, state: str = "active", timeout: float = 60) -> None:
        self.wait(
            lambda: self.prop(unit, "ActiveState") == state,
            timeout,
            f"{unit} to be {state}",
            lambda: self.ns.journalctl("-n", "60", "-u", unit),
        )

    def units(self, state: str = "active") -> list[str]:
        """wabridge units (services and the slice) in ``state``."""
        r = self.ns.systemctl(
            "list-units", "--all", "--plain", "--no-legend", f"--state={state}",
            "wabridge-*.service", "wabridge.slice",
        )
        return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]

    def processes(self) -> list[str]:
        """Command lines of processes inside that run wabridge's code (the venv, Claude)."""
        found = []
        proc = self.ns.root / "proc"
        for entry in proc.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                exe = os.readlink(entry / "exe")
            except OSError:
                continue
            line = " ".join(a.decode("utf-8", "replace") for a in argv if a)
            if VENV in line or VENV in exe or _OURS.search(line):
                found.append(f"{entry.name}: {line}")
        return found

    def request(self, user: str, status: str = "create_requested") -> None:
        """Write a request on the local control plane, as an application or wabridgectl would."""
        code = (
            "import asyncio, sys\n"
            "from controller.local import LocalPlane\n"
            "from wabridge.status import DocStatus\n"
            "asyncio.run(LocalPlane(sys.argv[1]).request(sys.argv[2], DocStatus(sys.argv[3])))\n"
        )
        r = self.ns.run([f"{VENV}/bin/python3", "-c", code, STATE_DB, user, status], timeout=60)
        if r.returncode != 0:
            raise AssertionError(f"request {user} {status} failed:\n{r.stdout}\n{r.stderr}")

    @staticmethod
    def wait(
        predicate: Callable[[], Any],
        timeout: float,
        what: str,
        diagnostics: Callable[[], str] | None = None,
    ) -> Any:
        return wait_until(predicate, timeout, what, diagnostics, interval=0.1)


def nsenter_hint(pid: int, argv: Sequence[str]) -> str:
    return f"nsenter -t {pid} -a {' '.join(argv)}"
