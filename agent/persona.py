"""Who the bot is for one account: its persona and model, parsed from the user's settings, and
the profile one chat's turn runs with (all pure).

==================  ==============================================  ====================
key                 values                                          default
==================  ==============================================  ====================
``systemPrompt``    text, at most :data:`MAX_PROMPT_CHARS` chars    ``claude.system_prompt``
``model``           one of ``claude.models_allowed``                ``claude.model``
``language``        a language name or code (at most 40 chars),     none
                    a hint appended to the system prompt
``apology``         text sent when a turn fails                     ``conversation.apology``
``budgetNotice``    text sent once a day over the daily budget      built in
``slowDownNotice``  text sent to a sender who writes too fast       built in
``takeover_minutes``minutes the bot pauses in a chat after the      60
                    owner wrote there from the phone (0: never)
==================  ==============================================  ====================

A chat may have the owner's own prompt (``/persona <chat> <text>`` in the self chat): it
replaces the account's ``systemPrompt`` for that chat only. The CLI runs with
``--system-prompt-snapshot off``, so a process started (or resumed) with the new prompt uses
it from its next turn; the pool restarts a chat's process whose profile changed
(:class:`Profile` equality), the ``api`` engine sends it with every request.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.policy import InvalidSetting

MAX_PROMPT_CHARS = 20_000  # ~5k tokens: a persona, not a knowledge base
MAX_NOTICE_CHARS = 1_000
MAX_LANGUAGE_CHARS = 40
DEFAULT_TAKEOVER_MINUTES = 60
MAX_TAKEOVER_MINUTES = 7 * 24 * 60


@dataclass(frozen=True)
class Persona:
    """The account's persona; None: the host's default."""

    system_prompt: str | None = None
    model: str | None = None
    language: str | None = None
    apology: str | None = None
    budget_notice: str | None = None
    slow_down_notice: str | None = None
    takeover_minutes: float = DEFAULT_TAKEOVER_MINUTES


@dataclass(frozen=True)
class Profile:
    """What one chat's Claude conversation is started with; None: the engine's default."""

    system_prompt: str | None = None
    model: str | None = None


DEFAULT = Persona()


def _text(settings: Mapping[str, Any], key: str, limit: int) -> str | None:
    value = settings.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidSetting(f"settings.{key}", f"expected text, got {type(value).__name__}",
                             allowed=f"text of at most {limit} characters")
    if len(value) > limit:
        raise InvalidSetting(f"settings.{key}", f"is {len(value)} characters long, more than "
                             f"{limit}", allowed=f"text of at most {limit} characters")
    return value if value.strip() else None


def parse(settings: Mapping[str, Any], models_allowed: tuple[str, ...]) -> Persona:
    """Validate the persona keys of the settings map; raises ``InvalidSetting``."""
    model = settings.get("model")
    if model not in (None, "") and (not isinstance(model, str) or model not in models_allowed):
        allowed = ", ".join(models_allowed) or "none (claude.models_allowed is empty)"
        raise InvalidSetting("settings.model", f"{model!r} is not an allowed model",
                             allowed=allowed)
    minutes = settings.get("takeover_minutes")
    if minutes is None:
        minutes = DEFAULT_TAKEOVER_MINUTES
    elif (isinstance(minutes, bool) or not isinstance(minutes, int | float)
          or not math.isfinite(minutes) or not 0 <= minutes <= MAX_TAKEOVER_MINUTES):
        raise InvalidSetting("settings.takeover_minutes",
                             f"{minutes!r} is not a number of minutes",
                             allowed=f"0 to {MAX_TAKEOVER_MINUTES} (0: never pause)")
    return Persona(
        system_prompt=_text(settings, "systemPrompt", MAX_PROMPT_CHARS),
        model=model or None,
        language=_text(settings, "language", MAX_LANGUAGE_CHARS),
        apology=_text(settings, "apology", MAX_NOTICE_CHARS),
        budget_notice=_text(settings, "budgetNotice", MAX_NOTICE_CHARS),
        slow_down_notice=_text(settings, "slowDownNotice", MAX_NOTICE_CHARS),
        takeover_minutes=float(minutes),
    )


def profile(persona: Persona, chat_prompt: str | None, host_prompt: str | None) -> Profile:
    """The profile of one chat's turn: the chat's own prompt, else the account's, else the
    host's; the language hint appended to whichever it is."""
    prompt = chat_prompt or persona.system_prompt or host_prompt
    if persona.language:
        hint = f"Reply in {persona.language} unless the contact writes in another language."
        prompt = f"{prompt}\n\n{hint}" if prompt else hint
    return Profile(system_prompt=prompt, model=persona.model)
