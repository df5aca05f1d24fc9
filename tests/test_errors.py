"""wabridge.errors: one tree, drawn as it is, every error with a code and an explanation."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import agent
import controller
import wabridge
from agent.claude import EXPLANATIONS, ClaudeError
from agent.whatsapp.base import SendError
from controller.admin import ADMIN_EXPLANATIONS, AdminError
from controller.ctl import USAGE, CtlError
from controller.unit_manager import SystemdError
from wabridge import errors
from wabridge.errors import NO_RESTART_EXIT_CODES, ExitCode, SchemaTooNew, WabridgeError


def _all_subclasses(cls: type) -> set[type]:
    out: set[type] = set()
    for sub in cls.__subclasses__():
        out |= {sub, *_all_subclasses(sub)}
    return out


@pytest.fixture(scope="module")
def tree() -> set[type]:
    for package in (wabridge, agent, controller):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            importlib.import_module(info.name)
    return {c for c in _all_subclasses(WabridgeError) if c.__module__.split(".")[0]
            in ("wabridge", "agent", "controller")}


def test_the_docstring_draws_every_error_class(tree: set[type]) -> None:
    doc = errors.__doc__ or ""
    missing = sorted(c.__name__ for c in tree if f" {c.__name__} " not in doc)
    assert missing == []


def test_agent_and_kernel_errors_are_in_the_tree_with_a_code_and_an_explanation(
        tree: set[type]) -> None:
    names = {c.__name__ for c in tree}
    assert {"ClaudeError", "SendError", "NeonizeStoreError", "SchemaTooNew",
            "InvalidSetting"} <= names
    for cls in tree:
        if cls.__module__.startswith(("agent", "wabridge")) and cls is not ClaudeError:
            assert cls.code != WabridgeError.code, cls
            assert cls.explanation, f"{cls.__name__} has no explanation for operators"


def test_controller_errors_are_in_the_tree_with_a_code_and_an_explanation(
        tree: set[type]) -> None:
    names = {c.__name__ for c in tree}
    assert {"AdminError", "CtlError", "PlaneError", "PlaneUnavailable", "PlaneDenied",
            "SystemdError"} <= names
    for cls in tree:
        if cls.__module__.startswith("controller"):
            assert cls.code != WabridgeError.code, cls
            assert cls.explanation, f"{cls.__name__} has no explanation for operators"


def test_per_instance_codes_explain_themselves() -> None:
    for code in ADMIN_EXPLANATIONS:
        exc = AdminError(code, "m")
        assert (exc.code, str(exc), exc.explanation) == (code, "m", ADMIN_EXPLANATIONS[code])
    usage = CtlError(USAGE, "bad_user_id", "m")
    assert (usage.exit_status, usage.code, str(usage)) == (USAGE, "bad_user_id", "m")
    assert "--help" in usage.explanation
    assert SystemdError("unavailable", "m").explanation.startswith("systemd's D-Bus API")


@pytest.mark.parametrize("code", sorted(EXPLANATIONS))
def test_each_claude_error_code_explains_itself(code: str) -> None:
    exc = ClaudeError(code, "it broke")  # type: ignore[arg-type]
    assert isinstance(exc, WabridgeError)
    assert exc.code == code and exc.explanation == EXPLANATIONS[code]  # type: ignore[index]
    assert str(exc) == f"[{code}] it broke"  # unchanged: logs and tests match on it


def test_a_class_explanation_does_not_change_the_message() -> None:
    exc = SendError("not connected")
    assert str(exc) == "not connected" and "outbox" in exc.explanation
    stated = SchemaTooNew("x", explanation="upgrade")
    assert str(stated) == "x (upgrade)" and stated.explanation == "upgrade"
    assert SchemaTooNew.exit_code in NO_RESTART_EXIT_CODES
    assert SchemaTooNew.exit_code == ExitCode.SCHEMA_TOO_NEW
