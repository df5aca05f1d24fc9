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
