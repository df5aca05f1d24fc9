"""agent.persona: the per-user persona keys, validated, and the profile a chat's turn gets."""

from __future__ import annotations

from typing import Any

import pytest

from agent import persona
from agent.persona import Persona, Profile
from agent.policy import InvalidSetting

MODELS = ("claude-haiku-4-5", "claude-sonnet-4-5")


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({}, Persona()),
        ({"systemPrompt": None, "model": None, "language": None}, Persona()),
        ({"systemPrompt": "You are Ana, the bakery's assistant."},
         Persona(system_prompt="You are Ana, the bakery's assistant.")),
        ({"systemPrompt": "   "}, Persona()),  # blank: the host's prompt
        ({"systemPrompt": "x" * persona.MAX_PROMPT_CHARS},
         Persona(system_prompt="x" * persona.MAX_PROMPT_CHARS)),
        ({"model": "claude-haiku-4-5"}, Persona(model="claude-haiku-4-5")),
        ({"model": ""}, Persona()),
        ({"language": "Portuguese"}, Persona(language="Portuguese")),
        ({"apology": "Desculpe!", "budgetNotice": "Amanhã.", "slowDownNotice": "Devagar."},
         Persona(apology="Desculpe!", budget_notice="Amanhã.", slow_down_notice="Devagar.")),
        ({"takeover_minutes": 0}, Persona(takeover_minutes=0.0)),
        ({"takeover_minutes": 2.5}, Persona(takeover_minutes=2.5)),
        ({"reply_to": "self", "backend": "sim"}, Persona()),  # other parts' keys
    ],
)
def test_parse(settings: dict[str, Any], expected: Persona) -> None:
    assert persona.parse(settings, MODELS) == expected


@pytest.mark.parametrize(
    ("settings", "models", "key", "allowed"),
    [
        ({"systemPrompt": 42}, MODELS, "settings.systemPrompt", "at most 20000"),
        ({"systemPrompt": "x" * (persona.MAX_PROMPT_CHARS + 1)}, MODELS,
         "settings.systemPrompt", "at most 20000"),
        ({"model": "claude-opus-4-1"}, MODELS, "settings.model", "claude-haiku-4-5"),
        ({"model": 3}, MODELS, "settings.model", "claude-sonnet-4-5"),
        ({"model": "claude-haiku-4-5"}, (), "settings.model", "claude.models_allowed is empty"),
        ({"language": "x" * 41}, MODELS, "settings.language", "at most 40"),
        ({"apology": ["sorry"]}, MODELS, "settings.apology", "text"),
        ({"takeover_minutes": -1}, MODELS, "settings.takeover_minutes", "0 to"),
        ({"takeover_minutes": True}, MODELS, "settings.takeover_minutes", "0 to"),
        ({"takeover_minutes": "60"}, MODELS, "settings.takeover_minutes", "0 to"),
        ({"takeover_minutes": float("nan")}, MODELS, "settings.takeover_minutes", "0 to"),
    ],
)
def test_bad_values_name_the_key(settings: dict[str, Any], models: tuple[str, ...], key: str,
                                 allowed: str) -> None:
    with pytest.raises(InvalidSetting) as info:
        persona.parse(settings, models)
    assert info.value.key == key
    assert allowed in info.value.explanation


HINT = "Reply in German unless the contact writes in another language."


@pytest.mark.parametrize(
    ("who", "chat_prompt", "host", "expected"),
    [
        (Persona(), None, "HOST", Profile("HOST", None)),
        (Persona(), None, None, Profile(None, None)),
        (Persona(system_prompt="USER"), None, "HOST", Profile("USER", None)),
        (Persona(system_prompt="USER"), "CHAT", "HOST", Profile("CHAT", None)),
        (Persona(), "CHAT", "HOST", Profile("CHAT", None)),
        (Persona(model="m1"), None, "HOST", Profile("HOST", "m1")),
        (Persona(system_prompt="USER", language="German"), None, "HOST",
         Profile(f"USER\n\n{HINT}", None)),
        (Persona(language="German"), "CHAT", None, Profile(f"CHAT\n\n{HINT}", None)),
        (Persona(language="German"), None, None, Profile(HINT, None)),
    ],
)
def test_profile(who: Persona, chat_prompt: str | None, host: str | None,
                 expected: Profile) -> None:
    assert persona.profile(who, chat_prompt, host) == expected


# The message is what the owner reads on the document's ``error``: written out in full.
@pytest.mark.parametrize(("settings", "models", "message"), [
    ({"systemPrompt": 42}, MODELS,
     "setting 'settings.systemPrompt': expected text, got int "
     "(allowed: text of at most 20000 characters)"),
    ({"apology": "x" * 1001}, MODELS,
     "setting 'settings.apology': is 1001 characters long, more than 1000 "
     "(allowed: text of at most 1000 characters)"),
    ({"model": "claude-opus-4-1"}, MODELS,
     "setting 'settings.model': 'claude-opus-4-1' is not an allowed model "
     "(allowed: claude-haiku-4-5, claude-sonnet-4-5)"),
    ({"model": "claude-haiku-4-5"}, (),
     "setting 'settings.model': 'claude-haiku-4-5' is not an allowed model "
     "(allowed: none (claude.models_allowed is empty))"),
    ({"takeover_minutes": 10081}, MODELS,
     "setting 'settings.takeover_minutes': 10081 is not a number of minutes "
     "(allowed: 0 to 10080 (0: never pause))"),
])
def test_bad_values_in_full(settings: dict[str, Any], models: tuple[str, ...],
                           message: str) -> None:
    with pytest.raises(InvalidSetting) as info:
        persona.parse(settings, models)
    assert str(info.value) == message


@pytest.mark.parametrize(("settings", "expected"), [
    ({}, 60.0),  # an hour unless the user says otherwise
    ({"takeover_minutes": 10080}, 10080.0),  # a week, the longest
])
def test_takeover_minutes(settings: dict[str, Any], expected: float) -> None:
    assert persona.parse(settings, MODELS).takeover_minutes == expected


@pytest.mark.parametrize("key", ["apology", "budgetNotice", "slowDownNotice"])
def test_a_notice_may_be_1000_characters(key: str) -> None:
    assert persona.parse({key: "x" * 1000}, MODELS) != persona.DEFAULT
