"""The chaos run's short mode, in CI: load and faults against a whole fleet; every
figure that must read zero reads zero (see ``bench/chaos.py``).

Plus targeted reproductions of what the chaos run found (all fixed since): an outcome (a
logout) while the controller is down; a new
request while the worker that reported an outcome is still stopping; an outcome exit that
overruns the stop timeout on a busy host.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from fakes.anthropic_api import Reply, default_responder
from fleet import Fleet, wait_until
from harness.systemd_ns import available

from bench import chaos

pytestmark = [
    pytest.mark.systemd,
    pytest.mark.firestore,
    pytest.mark.claude,
    pytest.mark.slow,
    pytest.mark.skipif(available() is not None, reason=f"no systemd harness: {available()}"),
]

CTL = "wabridge-controller.service"


@pytest.mark.timeout(400)
def test_short_chaos_run_loses_duplicates_and_misplaces_nothing(
    firestore_emulator: str, record_property: Any
) -> None:
    started = time.monotonic()
    results = chaos.run(chaos.Options.short_mode(out=None), emulator_host=firestore_emulator)
    took = time.monotonic() - started
    figures = results["figures"]
    for name in ("sent", "replies", "latency_p50_s", "latency_p99_s", "worker_restarts"):
        record_property(name, figures[name])
    print("\n" + chaos.table(results))
    failed = {name: figures[name] for name in chaos.ZERO_FIGURES if figures[name]}
    assert not failed, f"figures that must be zero: {failed}; details: " + str(
        {k: results["details"][k] for k in failed if k in results["details"]})
    # the faults really happened, and the load was answered
    injected = figures["faults_injected"]
    for fault in ("worker_kill", "claude_kill", "controller_kill", "logout", "api_529",
                  "api_hang"):
        assert injected.get(fault), f"{fault} was not injected: {injected}"
    assert figures["sent"] >= 30 and figures["answered"] >= figures["sent"] - figures[
        "excused_logged_out"]
    assert figures["repaired"] == figures["expected_repairs"] == [results["dedicated"]["logout"]]
    assert took < 180, f"the short mode must finish within 3 minutes (took {took:.0f} s)"


# --- an outcome while the controller is down ---------------------------------------------------


@pytest.fixture(scope="module")
def fleet(firestore_emulator: str) -> Iterator[Fleet]:
    with Fleet(plane="firestore", emulator_host=firestore_emulator) as f:
        yield f


def test_an_outcome_while_the_controller_is_down_stands(fleet: Fleet) -> None:
    phone = "5511900000401"
    fleet.link("carol", phone)
    unit = fleet.unit("carol")
    fleet.ns.systemctl("stop", CTL, check=True)
    try:
        fleet.sim.trigger(phone, "logout")
        fleet.wait_unit(unit, "inactive", 30)
    finally:
        fleet.ns.systemctl("start", CTL, check=True)
    seen = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status = fleet.doc("carol").get("status")
        if not seen or seen[-1] != status:
            seen.append(status)
        time.sleep(0.25)
    assert seen[-1] == "logged_out", f"statuses after the controller came back: {seen}"
    assert fleet.prop(unit, "ActiveState") == "inactive"


def test_a_request_while_the_old_worker_stops_is_not_undone(fleet: Fleet) -> None:
    phone = "5511900000402"
    fleet.link("dave", phone)
    fleet.api.reset_release()
    fleet.api.responder = lambda body: Reply(hang=True)  # a turn in flight: a slow stop
    try:
        fleet.sim.send("5511977770402", phone, "a slow one")
        assert fleet.api.wait_for_requests(1, 30)
        fleet.sim.trigger(phone, "replace")
        fleet.wait_doc("dave", lambda d: d.get("status") == "replaced", 30, "replaced")
        fleet.request("dave", "create_requested")  # what an app does on seeing "replaced"
        time.sleep(1.0)
    finally:
        fleet.api.responder = default_responder
        fleet.api.release()
    fleet.wait_unit(fleet.unit("dave"), "active", 60)
    time.sleep(3)
    doc = fleet.wait_doc("dave", lambda d: d.get("status") != "starting", 30, "a status")
    assert doc["status"] == "connected", (doc["status"], fleet.prop(fleet.unit("dave"),
                                                                    "ActiveState"))


def test_an_outcome_exit_on_a_busy_host_is_not_restarted(fleet: Fleet) -> None:
    phone = "5511900000403"
    fleet.link("erin", phone)
    unit = fleet.unit("erin")
    fleet.ask("5511977770403", phone, "hello")  # a Claude process to close on the way out
    # a busy host, for this worker only: 1% of a CPU from now on
    fleet.ns.systemctl("set-property", "--runtime", unit, "CPUQuota=1%", check=True)
    try:
        fleet.sim.trigger(phone, "logout")
        fleet.wait_doc("erin", lambda d: d.get("status") == "logged_out", 60, "logged_out")
        wait_until(lambda: fleet.prop(unit, "NRestarts") != "0"
                   or fleet.prop(unit, "ActiveState") == "inactive", 90, "the worker to end")
    finally:
        fleet.ns.systemctl("set-property", "--runtime", unit, "CPUQuota=", check=True)
    time.sleep(1)
    state = fleet.props(unit, "ActiveState", "Result", "NRestarts")
    assert state["NRestarts"] == "0" and state["ActiveState"] == "inactive", state
