"""``make run`` where systemd is not PID 1 (containers, CI): the Debian package, installed into
a private systemd namespace (``tests/harness/systemd_ns.py``), with the WhatsApp simulator.

    packaging/run_local.py DEB

Boots a real systemd as PID 1 of a private namespace with an overlay root (nothing touches
this host's disk or dpkg database), installs DEB there with ``dpkg -i`` (its postinst enables
and starts wabridge-controller on the local control plane), starts wabridge-sim.service, prints
what to try, and keeps running until Ctrl-C; then shuts the namespace down and discards it.

Workers use the simulator. Claude needs ANTHROPIC_API_KEY (or ANTHROPIC_AUTH_TOKEN) in this
environment; without it every turn fails and contacts get the configured apology.
Run with Debian's /usr/bin/python3 as root; standard library only.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from harness.net import free_port  # noqa: E402
from harness.packaged import (  # noqa: E402 - after the path set-up above
    CONTROLLER,
    VENV,
    PackagedHost,
    render_toml,
    sim_config,
)
from harness.systemd_ns import available  # noqa: E402

CLAUDE_ENV = ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL")


def _stop_on(signals: tuple[int, ...]) -> threading.Event:
    stop = threading.Event()

    def handler(_sig: int, _frame: FrameType | None) -> None:
        stop.set()

    for sig in signals:
        signal.signal(sig, handler)
    return stop


def _say(text: str = "") -> None:
    print(text, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("deb", type=Path, help="the wabridge .deb to install")
    parser.add_argument("--port", type=int, default=0, help="simulator port (default: free)")
    args = parser.parse_args(argv)

    reason = available()
    if reason is not None:
        _say(f"run-local: cannot boot a private systemd here: {reason}")
        return 1
    port = args.port or free_port()
    sections = sim_config(port)
    sections["controller"]["control_plane"] = "local"  # no Firebase here
    worker_env = "".join(f"{k}={os.environ[k]}\n" for k in CLAUDE_ENV if os.environ.get(k))

    stop = _stop_on((signal.SIGINT, signal.SIGTERM))
    _say(f"run-local: booting a private systemd and installing {args.deb.name} ...")
    t0 = time.monotonic()
    host = PackagedHost(args.deb, config=render_toml(sections), worker_env=worker_env)
    with host:
        host.wait_state(CONTROLLER, "active", 60)
        host.ns.systemctl("start", "wabridge-sim.service", check=True)
        host.wait_state("wabridge-sim.service", "active", 30)
        probe = "import importlib.util as u, sys; sys.exit(u.find_spec('controller.ctl') is None)"
        has_ctl = host.ns.run([f"{VENV}/bin/python3", "-c", probe]).returncode == 0
        _print_guide(host.pid, port, time.monotonic() - t0, has_ctl, bool(worker_env))
        while not stop.wait(1.0):
            if not host.ns.pid or not Path(f"/proc/{host.ns.pid}").exists():
                _say("run-local: the namespace's systemd exited")
                return 1
        _say("\nrun-local: stopping (the namespace and everything in it are discarded) ...")
    _say("run-local: stopped.")
    return 0


def _print_guide(pid: int, port: int, seconds: float, has_ctl: bool, has_key: bool) -> None:
    ns = f"nsenter -t {pid} -a"
    request = shlex.quote(
        "import asyncio; from controller.local import LocalPlane; "
        "from wabridge.status import DocStatus; "
        "asyncio.run(LocalPlane('/var/lib/wabridge/control/control.db')"
        ".request('alice', DocStatus.CREATE_REQUESTED))"
    )
    link = (
        f"{ns} wabridgectl link alice"
        if has_ctl
        else f"{ns} {VENV}/bin/python3 -c {request}   # (wabridgectl is not written yet)"
    )
    _say(f"""
wabridge is installed and running in a private systemd (ready in {seconds:.0f} s).
  controller: wabridge-controller.service, local control plane
  simulator:  http://127.0.0.1:{port}  (simulated phones: scan QR codes, chat as a contact)

Try, from another terminal on this host (as root):
  {link}
      then scan alice's QR on the simulator page, and send alice a message from a contact
  {ns} wabridgectl status
  {ns} systemctl status 'wabridge-*'
  {ns} journalctl -f -u 'wabridge-*'
  {ns} bash                                  # a shell inside
""")
    if not has_key:
        _say(
            "No ANTHROPIC_API_KEY (or ANTHROPIC_AUTH_TOKEN) in the environment: every Claude turn\n"
            "will fail and contacts get the apology. Export one and run `make run` again.\n"
        )
    _say("Ctrl-C stops it all.")


if __name__ == "__main__":
    sys.exit(main())
