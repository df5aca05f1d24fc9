"""The Debian package, installed, upgraded, removed and purged inside a real systemd.

The package is built once per session with ``packaging/build-deb --level 0`` into
``build/test-dist`` (an unchanged tree reuses the last build: build-deb's "up to date"), and
installed with ``dpkg -i`` into a private systemd namespace that holds nothing of this
repository: only the directory of .deb files is bound in. See ``harness/packaged.py``.

``host`` (module scope) is one installed system that the ordered tests below walk through:
installed -> verified -> a worker from a request -> ``dpkg -r`` -> ``dpkg -P``. The operator's
whole flow with the Firestore emulator (link, answer, status and journal, upgrade, remove, purge)
has a namespace of its own. To add a scenario with other settings, use ``installed`` and
parametrize it indirectly with ``PackagedHost`` keyword arguments::

    @pytest.mark.parametrize(
        "installed",
        [{"config": {...sections...}, "worker_env": "ANTHROPIC_API_KEY=...\\n"}],
        indirect=True,
    )
    def test_flow(installed: PackagedHost) -> None: ...
"""

from __future__ import annotations

import itertools
import os
import secrets
import shutil
import subprocess
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes.anthropic_api import FakeAnthropicAPI
from fleet import SimClient, firestore_client
from harness.net import free_port
from harness.packaged import (
    CONTROLLER,
    REPO,
    VENV,
    PackagedHost,
    build_deb,
    deb_tools_missing,
    sim_config,
    upstream_version,
)
from harness.systemd_ns import available

from wabridge.units import worker_unit

# the first test also waits for the package build (minutes when the tree changed)
pytestmark = [pytest.mark.systemd, pytest.mark.slow, pytest.mark.timeout(1800)]

OUT = REPO / "build" / "test-dist"
# xz level of the packages built here: only the compression differs from `make deb`'s -6, and
# -0 takes ~30 s where -6 takes 3-5 min on two cores (a CI run builds both packages afresh).
LEVEL = int(os.environ.get("WABRIDGE_TEST_DEB_LEVEL", "0"))
UNITS = (
    "wabridge-controller.service",
    "wabridge-worker@.service",
    "wabridge.slice",
    "wabridge-sim.service",
)
WORKER = "wabridge-worker@alice.service"


def _unavailable() -> str | None:
    reason = available()
    if reason is not None:
        return f"no systemd harness: {reason}"
    return deb_tools_missing()


@pytest.fixture(scope="session")
def deb() -> Path:
    reason = _unavailable()
    if reason is not None:
        print(f"test_package skipped: {reason}")
        pytest.skip(reason)
    return build_deb(OUT, level=LEVEL)


@pytest.fixture(scope="session")
def deb_next(deb: Path) -> Path:
    """The same tree with a higher version, for the upgrade path."""
    return build_deb(OUT, version=f"{upstream_version()}-1+next1", level=LEVEL)


def _sim_settings() -> dict[str, Any]:
    port = free_port()
    return {"config": sim_config(port)}


@pytest.fixture
def installed(request: pytest.FixtureRequest, deb: Path) -> Iterator[PackagedHost]:
    """A booted namespace with the package installed and the controller active.

    Parametrize indirectly with ``PackagedHost`` keyword arguments (``config``, ``worker_env``,
    ``controller_env``, ``files``); they are written before ``dpkg -i`` runs. Without them the
    workers use the simulator on a free port."""
    kwargs: dict[str, Any] = getattr(request, "param", None) or _sim_settings()
    with PackagedHost(deb, **kwargs) as host:
        host.wait_state(CONTROLLER, "active", 60)
        yield host


@pytest.fixture(scope="module")
def host(deb: Path) -> Iterator[PackagedHost]:
    with PackagedHost(deb, **_sim_settings()) as h:
        yield h


# --- one installed system, walked through in order ---------------------------------------


def test_controller_is_enabled_and_active(host: PackagedHost) -> None:
    host.wait_state(CONTROLLER, "active", 60)
    assert host.prop(CONTROLLER, "UnitFileState") == "enabled"
    assert host.prop(CONTROLLER, "FragmentPath") == f"/lib/systemd/system/{CONTROLLER}"
    assert host.version().split()[0] == f"{upstream_version()}-1"
    assert host.ns.run(["getent", "group", "wabridge-admin"]).returncode == 0
    assert host.ns.run(["test", "-d", "/var/lib/wabridge"]).returncode == 0


def test_installed_files(host: PackagedHost) -> None:
    run = host.ns.run
    for cmd in ("wabridge-controller", "wabridge-worker", "wabridgectl", "wabridge-sim"):
        target = run(["readlink", "-f", f"/usr/bin/{cmd}"]).stdout.strip()
        assert target == f"{VENV}/bin/{cmd}"
        head = (host.ns.root / target.lstrip("/")).read_text().splitlines()[0]
        assert head == f"#!{VENV}/bin/python3"
    cfg = (host.ns.root / "usr/lib/wabridge/venv/pyvenv.cfg").read_text()
    assert f"command = /usr/bin/python3 -m venv {VENV}" in cfg
    # bytecode was compiled by postinst at the final path
    pycache = f"{VENV}/lib/python3.11/site-packages/wabridge/__pycache__"
    assert run(["test", "-d", pycache]).returncode == 0
    # the packaged conffile (kept beside ours as .dpkg-dist) parses to the defaults
    dist = host.ns.root / "etc/wabridge/wabridge.toml.dpkg-dist"
    assert dist.exists(), "dpkg did not keep the packaged conffile beside the test's one"
    parsed = tomllib.loads(dist.read_text())
    assert {"controller", "worker", "claude"} <= parsed.keys()
    assert all(values == {} for values in parsed.values()), "every option should be commented out"
    check = run(
        [f"{VENV}/bin/python3", "-c",
         "import sys, pathlib; from wabridge import config;"
         " sys.exit(config.load(pathlib.Path(sys.argv[1]), {}) != config.Config())",
         "/etc/wabridge/wabridge.toml.dpkg-dist"]
    )
    assert check.returncode == 0, check.stderr
    for doc in ("copyright", "changelog.Debian.gz", "README.md"):
        assert (host.ns.root / "usr/share/doc/wabridge" / doc).exists()
    assert (host.ns.root / "usr/share/man/man1/wabridgectl.1.gz").exists()
    # the admin group reads the journal (wabridgectl logs; tests/test_ctl_e2e.py)
    assert (host.ns.root / "usr/lib/tmpfiles.d/wabridge.conf").exists()
    copyright_text = (host.ns.root / "usr/share/doc/wabridge/copyright").read_text()
    assert "Anthropic-proprietary" in copyright_text


def test_units_verify_clean(host: PackagedHost) -> None:
    r = host.ns.run(
        ["systemd-analyze", "verify", "--man=no", *(f"/lib/systemd/system/{u}" for u in UNITS)]
    )
    assert r.returncode == 0 and not r.stderr.strip() and not r.stdout.strip(), (
        r.stdout + r.stderr
    )


def test_worker_prints_usage(host: PackagedHost) -> None:
    r = host.ns.run(["/usr/bin/wabridge-worker"])
    assert r.returncode == 15, r.stderr
    assert "usage: wabridge-worker <userId>" in r.stderr


def test_wabridgectl_help(host: PackagedHost) -> None:
    r = host.ns.run(["/usr/bin/wabridgectl", "--help"])
    assert r.returncode == 0, r.stderr
    assert "usage" in r.stdout.lower()


def test_a_dynamic_user_can_run_the_venv(host: PackagedHost) -> None:
    """Workers are DynamicUser units: the venv and the Claude binary must be world-readable."""
    r = host.ns.run(
        ["systemd-run", "--wait", "--pipe", "--quiet", "-p", "DynamicUser=yes",
         f"{VENV}/bin/python3", "-c",
         "import agent.main, controller.main, sim.main, neonize, pystemd, claude_agent_sdk;"
         " from agent.main import default_cli_path; print(default_cli_path())"],
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    cli = r.stdout.strip().splitlines()[-1]
    assert cli == f"{VENV}/lib/python3.11/site-packages/claude_agent_sdk/_bundled/claude"
    v = host.ns.run(
        ["systemd-run", "--wait", "--pipe", "--quiet", "-p", "DynamicUser=yes",
         "-p", "Environment=HOME=/tmp", cli, "--version"],
        timeout=120,
    )
    assert v.returncode == 0, v.stdout + v.stderr
    assert "Claude Code" in v.stdout


def test_a_request_starts_a_worker(host: PackagedHost) -> None:
    host.ns.systemctl("start", "wabridge-sim.service", check=True)
    host.request("alice")
    host.wait_state(WORKER, "active", 90)
    assert host.prop(WORKER, "Slice") == "wabridge.slice"
    assert host.prop(WORKER, "DynamicUser") == "yes"


def test_remove_stops_everything(host: PackagedHost) -> None:
    host.remove()
    assert host.units("active") == []
    assert host.units("activating") == []
    assert host.processes() == []
    assert host.version().split()[-1] == "rc"  # removed, configuration kept
    root = host.ns.root
    assert not (root / "usr/lib/wabridge").exists(), "files left in the venv (bytecode?)"
    assert not (root / "usr/bin/wabridgectl").exists()
    assert not (root / "lib/systemd/system/wabridge-worker@.service").exists()
    assert not (root / f"etc/systemd/system/multi-user.target.wants/{CONTROLLER}").exists()
    # what dpkg -r keeps: configuration and the accounts' state
    assert (root / "etc/wabridge/wabridge.toml").exists()
    assert (root / "var/lib/wabridge").is_dir()


def test_reinstall_after_remove_enables_the_controller_again(host: PackagedHost) -> None:
    host.install(host.deb)
    host.wait_state(CONTROLLER, "active", 60)
    assert host.prop(CONTROLLER, "UnitFileState") == "enabled"
    assert (host.ns.root / "var/lib/private/wabridge/alice").is_dir(), "state lost by dpkg -r"


def test_purge_removes_state_and_configuration(host: PackagedHost) -> None:
    host.remove(purge=True)  # from the installed state: prerm and postrm remove run too
    assert host.units("active") == []
    assert host.processes() == []
    root = host.ns.root
    for path in ("etc/wabridge", "var/lib/wabridge", "var/lib/private/wabridge",
                 "var/lib/private/wabridge-sim"):
        assert not (root / path).exists(), f"/{path} survived dpkg -P"
    assert host.ns.run(["getent", "group", "wabridge-admin"]).returncode != 0
    assert host.version() == ""


# --- lintian --------------------------------------------------------------------------------


def test_lintian_reports_no_errors(deb: Path) -> None:
    """Every error lintian knows is fixed or overridden with a reason (packaging/README.md)."""
    if shutil.which("lintian") is None:
        pytest.skip("lintian is not installed (apt-get install lintian)")
    r = subprocess.run(
        ["lintian", "--fail-on", "error", "--display-level", ">=warning", str(deb)],
        capture_output=True, text=True, timeout=900, check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    warnings = [line for line in r.stdout.splitlines() if line.startswith("W:")]
    assert not warnings, "new lintian warnings: explain or fix them\n" + "\n".join(warnings)


# --- the whole flow: Firestore, link, answer, upgrade, remove, purge ----------------------

ACCOUNTS = {"alice": "5511999990701", "bob": "5511999990702"}
CONTACT = "5511988880701"


@pytest.mark.firestore
@pytest.mark.claude
def test_installed_fleet_links_answers_survives_an_upgrade_and_goes_away(
        deb: Path, deb_next: Path, firestore_emulator: str) -> None:
    """What an operator lives through, on the installed package with the Firestore emulator:
    ``create_requested`` -> QR -> scan -> a message answered by the real CLI through the fake
    API -> ``systemctl status`` and ``journalctl USER_ID=`` -> ``dpkg -i`` of a newer version
    (controller and workers restarted one at a time, no new QR, context resumed) -> ``dpkg -r``
    (nothing left running) -> ``dpkg -P`` (state and configuration gone)."""
    port = free_port()
    project = f"demo-{secrets.token_hex(4)}"
    config = sim_config(port)
    config["controller"] = {**config["controller"], "control_plane": "firestore"}
    config["firebase"] = {"emulator_host": firestore_emulator, "project_id": project}
    config["conversation"] = {"debounce": 0.2}
    config["limits"] = {"send_gap": 0.0, "send_jitter": 0.0}
    with FakeAnthropicAPI() as api, PackagedHost(
            deb, config=config,
            worker_env=f"ANTHROPIC_BASE_URL={api.base_url}\nANTHROPIC_API_KEY=test-key\n") as h:
        h.wait_state(CONTROLLER, "active", 60)
        h.ns.systemctl("start", "wabridge-sim.service", check=True)
        sim = SimClient(f"http://127.0.0.1:{port}")
        h.wait(sim.healthy, 60, "wabridge-sim.service to answer")
        db = firestore_client(firestore_emulator, project)
        sessions = db.collection("user_sessions")
        units = {user: worker_unit(user) for user in ACCOUNTS}

        def doc(user: str) -> dict[str, Any]:
            return dict(sessions.document(user).get().to_dict() or {})

        def wait_doc(user: str, predicate: Callable[[dict[str, Any]], Any], what: str,
                     timeout: float = 90) -> dict[str, Any]:
            h.wait(lambda: predicate(doc(user)), timeout, f"{user}: {what}",
                   lambda: f"document: {doc(user)}\n"
                           + h.ns.journalctl("--no-pager", "-o", "cat", "-n", "60"))
            return doc(user)

        def journal(*match: str) -> str:
            return h.ns.journalctl("--no-pager", "-o", "cat", *match)

        # --- link: a document asks, the worker shows a QR, the phone scans it
        for user in ACCOUNTS:
            sessions.document(user).set({"status": "create_requested"})
        for user, phone in ACCOUNTS.items():
            shown = wait_doc(user, lambda d: d.get("qrRaw"), "a QR code on the document")
            assert str(shown["qrCode"]).startswith("data:image/png;base64,")
            sim.scan(phone, shown["qrRaw"])
            linked = wait_doc(user, lambda d: d.get("status") == "connected", "connected")
            assert linked["phone"] == phone
            assert h.prop(units[user], "DynamicUser") == "yes"

        # --- a contact writes; the real CLI answers through the fake API
        alice, alice_unit = ACCOUNTS["alice"], units["alice"]
        diagnostics = lambda: journal("-n", "80")  # noqa: E731
        reply = sim.ask(CONTACT, alice, "hello from the package", 90, diagnostics)
        assert "echo: hello from the package" in reply["text"]

        # --- what `systemctl status` and `journalctl USER_ID=` show the operator
        status = h.wait(
            lambda: (out := h.ns.systemctl("status", "--no-pager", alice_unit).stdout)
            and "1 chat " in out and out, 15, "the status line to count the chat")
        assert f'Status: "connected as +{alice} - 1 chat - ' in status
        lifecycle = journal("USER_ID=alice")
        for event in ("worker.started", "whatsapp.qr_generated", "whatsapp.ready",
                      "whatsapp.message_received", "outbox.delivered"):
            assert event in lifecycle, f"{event} missing from journalctl USER_ID=alice"
        assert ACCOUNTS["bob"] not in lifecycle, "bob's lines under alice's USER_ID"

        # --- upgrade: everything restarts, one worker at a time, and keeps its link
        qr_at = {user: doc(user)["qrAt"] for user in ACCOUNTS}
        before = {u: h.prop(u, "InvocationID") for u in (CONTROLLER, *units.values())}
        cursor = h.ns.run(["journalctl", "-n", "1", "--show-cursor", "--no-pager"]).stdout
        since = cursor.rsplit("cursor: ", 1)[-1].strip()

        # what a front end watching the documents sees during the upgrade: no flapping
        seen: list[tuple[str, object]] = []
        watch = sessions.on_snapshot(lambda _docs, changes, _at: seen.extend(
            (c.document.id, (c.document.to_dict() or {}).get("status")) for c in changes))
        h.wait(lambda: len(seen) >= len(ACCOUNTS), 30, "the listener's first snapshot")

        h.install(deb_next)

        assert h.version() == f"{upstream_version()}-1+next1 ii"
        for unit, invocation in before.items():
            h.wait_state(unit, "active", 90)
            assert h.prop(unit, "InvocationID") != invocation, f"{unit} was not restarted"
        assert h.prop(CONTROLLER, "UnitFileState") == "enabled"
        spans = sorted(
            (int(h.prop(u, "ActiveExitTimestampMonotonic")),
             int(h.prop(u, "ActiveEnterTimestampMonotonic")), u)
            for u in units.values()
        )
        for (_, up, first), (down, _, second) in itertools.pairwise(spans):
            assert down >= up, f"{second} stopped before {first} was active again"
        for user in ACCOUNTS:
            wait_doc(user, lambda d: d.get("status") == "connected", "connected after upgrade")
            assert doc(user)["qrAt"] == qr_at[user], f"{user} was asked for a new QR"
        watch.unsubscribe()
        # The upgrade restarts the simulator too, so "disconnected" is what WhatsApp's
        # stand-in did; wabridge's own restarts (controller, each worker) show nothing.
        flaps = [(user, status) for user, status in seen
                 if status not in ("connected", "disconnected")]
        assert flaps == [], f"documents flapped during the upgrade: {flaps}"
        after = h.ns.journalctl("--no-pager", "-o", "cat", f"--after-cursor={since}")
        assert "whatsapp.qr_generated" not in after, "a worker showed a QR after the upgrade"
        assert "whatsapp.ready" in after

        api.clear()
        reply = sim.ask(CONTACT, alice, "and after the upgrade?", 90, diagnostics)
        assert "echo: and after the upgrade?" in reply["text"]
        texts = " ".join(" ".join(api.all_texts(r)) for r in api.message_requests())
        assert "hello from the package" in texts, "the conversation lost its context"

        # --- dpkg -r: nothing of wabridge keeps running, and the documents say so
        h.remove()
        assert h.units("active") == [] and h.units("activating") == []
        assert h.processes() == []
        assert h.version().split()[-1] == "rc"
        for user in ACCOUNTS:
            gone = doc(user)
            assert gone["status"] == "stopped", f"{user}: {gone}"
            assert "wabridge was removed from this host" in gone["statusDetail"]
            assert gone["process"]["pid"] == 0 and gone["process"]["state"] == "inactive"

        # --- dpkg -P: state and configuration gone
        h.remove(purge=True)
        for path in ("etc/wabridge", "var/lib/wabridge", "var/lib/private/wabridge"):
            assert not (h.ns.root / path).exists(), f"/{path} survived dpkg -P"
