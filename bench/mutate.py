"""``python -m bench.mutate`` (``make mutate``): mutation testing of the pure decision modules.

Each module's source is parsed once; every mutant is one small AST edit (a comparison or
operator swapped, a constant or a string changed, a boolean operand dropped, a table entry
removed, a regex edited, a call statement removed) anywhere in the module, module-level tables
and regexes included (mutmut 3 skips module-level code, where most of our tables live). A
mutant runs the module's own fast test files (``MODULES``) with ``pytest -x`` in a forked
child of this process, which has already imported pytest and the third-party libraries, so a
mutant costs the test run and little else; the child loads the mutated module through an
import hook instead of writing it to disk, so two mutants run at once (one per core) without
touching the worktree. A mutant the tests pass is a *survivor*.

Survivors that are equivalent (no test could tell them from the original) or accepted for a
stated reason are listed in ``EXPLAINED``, keyed by module, mutation and source line (not line
numbers, which move); the report shows each survivor with its explanation, or UNEXPLAINED.

Results: ``bench/results/mutate-<UTC time>.json`` and ``.md`` (score per module, survivors).
``python -m bench.mutate agent/budget.py`` runs one module; ``--list`` prints mutants only.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import os
import re
import signal
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

REPO = Path(__file__).resolve().parent.parent

# Each decision module and the fast test files (or one test: file::name) that cover it.
MODULES: dict[str, list[str]] = {
    # written-out tables first: they are quick, and -x stops at the first failure
    "controller/reconcile.py": [
        "tests/test_reconcile_mutants.py", "tests/test_reconcile.py",
        # the pure table of that file; the rest of it runs PostgreSQL
        "tests/test_controller_store_outage.py::"
        "test_a_start_postgres_refused_is_tried_again_only_while_wanted"],
    "agent/policy.py": ["tests/test_policy_mutants.py", "tests/test_policy.py"],
    "agent/outcomes.py": ["tests/test_outcomes_mutants.py", "tests/test_outcomes.py"],
    "agent/shaping.py": ["tests/test_shaping_mutants.py", "tests/test_shaping.py"],
    "agent/budget.py": ["tests/test_budget_mutants.py", "tests/test_budget.py"],
    "agent/rotation.py": ["tests/test_budget_mutants.py", "tests/test_budget.py"],
    "agent/commands.py": ["tests/test_commands_mutants.py", "tests/test_commands.py",
                          "tests/test_policy.py"],
    "agent/delivery.py": ["tests/test_delivery_mutants.py", "tests/test_delivery.py"],
    # the pure parts of test_tools.py, all written out here (the rest of it runs Claude)
    "agent/scheduling.py": ["tests/test_scheduling_mutants.py"],
    "controller/slots.py": ["tests/test_slots.py"],
    "agent/burst.py": ["tests/test_burst.py"],
    "agent/takeover.py": ["tests/test_takeover.py"],
    "agent/persona.py": ["tests/test_persona.py"],
    "agent/lease_verdict.py": ["tests/test_lease_verdict.py"],
    "controller/assignment.py": ["tests/test_assignment.py"],
    "wabridge/units.py": ["tests/test_units_mutants.py", "tests/test_units.py",
                          "tests/test_lease_verdict.py"],
    "wabridge/config.py": ["tests/test_docs.py", "tests/test_config_bounds.py",
                           "tests/test_config.py"],
}

PYTEST_ARGS = ["-x", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
               "--hypothesis-seed=0", "-W", "ignore::pytest.PytestAssertRewriteWarning"]

# Survivors judged by hand: (module, mutation, stripped source line) -> why it may survive.
# "equivalent: ..." means no input can tell the mutant apart; "accepted: ..." a real change
# that is deliberately left untested, with the reason.
_SIX_STARS = ("accepted: differs only on a line of six or more '*' (a Markdown thematic break), "
              "which both versions shorten; not a reply Claude writes")
_EVERY_FIELD = ("equivalent: every field is declared with _opt, whose metadata always holds "
                "'allowed', so the .get() default is never used")
_HOLE_LINE = ('_HOLE = re.compile("\\ue000(\\\\d+)\\ue001")  # placeholder for text that must '
              'stay verbatim')
_ONLY_PLACEHOLDERS = ("equivalent: the text's own U+E000/U+E001 are held first, so the only ones "
                      "left are the placeholders, with digits between them")
_TZ_LINE = r'_TZ_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_+\-]*(/[A-Za-z0-9_+\-]+)*$")'
_TZ_CHECK = "if not isinstance(value, str) or len(value) > 64 or not _TZ_NAME.match(value):"
_ZONEINFO_TOO = ("equivalent: zoneinfo.ZoneInfo refuses every such name as well (not found, "
                 "or ValueError for an empty part, '..', a leading '/' or a non-zone file such "
                 "as zone.tab), so the setting is refused with the same message; the check "
                 "stays as a guard before a file lookup")
_PG_URL_RULE = 'if re.match(r"^[a-z]+://[^/@]*:[^/@]*@", text) or "password=" in text:'
_SELF_CHAT_ID = ('return (bool(owner_phone) and not chat_id.endswith("@g.us")')
_NO_GROUP_IS_A_PHONE = ("equivalent: a group JID's user part is never a phone number (1203630... "
                        "of 18 digits, or the older <creator>-<time>), so phone_of() of it never "
                        "equals the owner's number; is_self_chat checks is_group first anyway")
EXPLAINED: dict[tuple[str, str, str], str] = {
    ("agent/policy.py", "regex: '*' -> '+' at 23", _TZ_LINE):
        "equivalent: no IANA zone name has a one-letter first part, so requiring two letters "
        "refuses no zone",
    ("agent/policy.py", "regex: '+' -> '*' at 40", _TZ_LINE): _ZONEINFO_TOO,
    ("agent/policy.py", "regex: '$' removed at 43", _TZ_LINE): _ZONEINFO_TOO,
    ("agent/policy.py", "operand 'len(value) > 64' dropped", _TZ_CHECK): _ZONEINFO_TOO,
    ("agent/policy.py", "> -> >=", _TZ_CHECK): _ZONEINFO_TOO,
    ("agent/budget.py", "operand 'slowed' dropped",
     "if slowed and take(bucket, now, rate_per_minute, burst)[1].tokens + 1.0 >= burst:"):
        "equivalent: the branch only sets slowed to False, which a sender not slowed already is",
    ("agent/delivery.py", "<= -> < #2", "if attempts <= 0 or base <= 0:"):
        "equivalent: a base of 0 waits 0 * 2**n = 0.0 seconds on either branch",
    ("agent/policy.py", "64 -> 65", _TZ_CHECK): _ZONEINFO_TOO,
    ("agent/policy.py", "operand 'not msg.is_group' dropped",
     "if not msg.from_me and (is_bot(msg.sender) or (not msg.is_group and is_bot(msg.chat_id))):"):
        "equivalent: a group's chat is a ...@g.us JID, which is_bot never calls a bot",
    ("agent/policy.py", "operand 'not _TZ_NAME.match(value)' dropped", _TZ_CHECK): _ZONEINFO_TOO,
    ("controller/reconcile.py", "operand 'code is not None' dropped",
     "if (doc.status in RUNNING_STATUSES and (unit is None or not unit.running)"):
        "equivalent: None is no key of EXIT_OUTCOMES, so `code in ...` alone is False "
        "for it",
    ("agent/policy.py", "operand 'not isinstance(value, str)' dropped",
     "if not isinstance(value, str) or value not in choices:"):
        "equivalent: a value that is not a str never equals one of the choice strings, so "
        "`value not in choices` refuses it too",
    ("agent/commands.py", "regex: '*' -> '+' at 38",
     '_COMMAND = re.compile(r"^/([A-Za-z][A-Za-z0-9_-]{0,31})(?:\\s+(.*))?$", re.DOTALL)'):
        "equivalent: the text is stripped first, so after \\s+ there is always a character "
        "for (.+) as for (.*)",
    ("agent/shaping.py", "regex: '?' removed at 4",
     '_TABLE_RULE = re.compile(r"^\\s*\\|?\\s*:?-{3,}:?\\s*(\\|\\s*:?-{3,}:?\\s*)*'
     '\\|?\\s*$")'):
        "equivalent: only a stripped line starting with '|' is tested against the rule, so "
        "the leading '|' is always there",
    ("agent/shaping.py", "regex: '+' -> '*' at 10",
     '_BOLD_ITALIC = re.compile(r"\\*\\*\\*(?!\\s)(.+?)(?<!\\s)\\*\\*\\*")'): _SIX_STARS,
    ("agent/shaping.py", "regex: '+' -> '*' at 4",
     '_BOLD = re.compile(r"\\*\\*(.+?)\\*\\*|(?<!\\w)__(?!\\s)(.+?)(?<!\\s)__(?!\\w)")'):
        _SIX_STARS,
    ("agent/shaping.py", "regex: '?' removed at 22",
     '_ITALIC_STAR = re.compile(r"(?<![*\\w])\\*(?!\\s)([^*\\n]+?)(?<!\\s)\\*(?![*\\w])")'):
        "equivalent: [^*\\n] cannot take the closing '*', so a lazy and a greedy run stop at "
        "the same star",
    ("wabridge/config.py", "'' -> 'XX'", 'allowed=fdef.metadata.get("allowed", ""),'):
        _EVERY_FIELD,
    ("wabridge/config.py", "'' -> 'XX'",
     'raise ConfigError(key, problem, allowed=fdef.metadata.get("allowed", ""))'): _EVERY_FIELD,
    ("wabridge/config.py", "'' -> 'XX'",
     "f\"{fdef.metadata.get('allowed', '') or str(fdef.type)} | {fdef.metadata['doc']} |\""):
        _EVERY_FIELD,
    ("wabridge/config.py", "'' -> 'XX'",
     'default = fdef.default if fdef.default is not MISSING else ""'):
        "equivalent: every key has a default (the schema's _opt requires one)",
    ("agent/shaping.py", "// -> /",
     "if len(opening) + 5 > limit // 2:  # an absurd language tag: drop it"):
        "equivalent: for a whole number n, n > limit // 2 exactly when n > limit / 2",
    ("agent/shaping.py", "operand 'line' dropped", "if len(candidate) > limit and line:"):
        "equivalent: with no line yet the candidate is one word or sentence, already cut to "
        "the limit",
    ("agent/shaping.py", "operand 'chunk' dropped",
     'if chunk and len("\\n".join([*chunk, line])) > width:'):
        "equivalent: a single line is already cut to the width, so an empty chunk never "
        "overflows",
    ("agent/shaping.py", "1 -> 2",
     "line = _LINK.sub(lambda m: m.group(1) if m.group(1) == m.group(2) else"):
        "equivalent: this branch is taken when both groups are equal",
    ("wabridge/units.py", "':_.' -> 'XX:_.XX'",
     '_KEEP = frozenset(string.ascii_letters + string.digits + ":_.")'):
        "equivalent: 'X' is an ASCII letter, kept already",
    ("wabridge/units.py", "operand 'c.isascii()' dropped",
     'safe = "".join(c for c in user_id.lower() if c.isascii() and c.isalnum())[:16]'):
        "equivalent: validate_user_id has refused every non-ASCII id before this line",
    ("wabridge/config.py", "regex: '+' -> '*' at 1",
     'check=_matches(r"\\d+|\\d+(\\.\\d+)?%|infinity", "a number, a percentage or infinity"),'):
        "equivalent: \\d* adds only the empty string, which _matches accepts before the "
        "pattern (empty: the unit file's value)",
    ("wabridge/config.py", "operand 'not sep' dropped",
     "if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:"):
        "equivalent: without ':' rpartition leaves the host empty, which `not host` refuses",
    ("agent/shaping.py", "regex: \\d -> \\w at 2", _HOLE_LINE): _ONLY_PLACEHOLDERS,
    ("agent/shaping.py", "regex: '+' -> '*' at 3", _HOLE_LINE): _ONLY_PLACEHOLDERS,
    ("agent/shaping.py", "False -> True", "has_rows = False  # the current table has body rows"):
        "equivalent: has_rows is set with the header before it is read",
    ("agent/shaping.py", "regex: '+' -> '*' at 15", '_URL = re.compile(r"https?://[^\\s()]+")'):
        "equivalent: an empty tail holds just 'http(s)://', which has no markup to protect",
    ("agent/policy.py", "'@g.us' -> 'XX@g.usXX'", _SELF_CHAT_ID): _NO_GROUP_IS_A_PHONE,
    ("agent/policy.py", "operand \"not chat_id.endswith('@g.us')\" dropped", _SELF_CHAT_ID):
        _NO_GROUP_IS_A_PHONE,
    ("agent/policy.py", "operand 'msg.from_me' dropped",
     "if msg.from_me and not is_self_chat(msg, owner_phone):"):
        "accepted: it differs only for a message from the account's own number that is not "
        "from_me, in a chat other than the self chat; whatsmeow sets IsFromMe from the "
        "sender's user, so WhatsApp delivers no such message; noted in the report of "
        "2026-12-05 as a question for the lead (the test rows have it only in the self chat)",
    ("agent/persona.py", "operand 'not isinstance(model, str)' dropped",
     'if model not in (None, "") and (not isinstance(model, str) or model not in '
     'models_allowed):'):
        "equivalent: a value that is not a str never equals one of the allowed model names, "
        "so `model not in models_allowed` refuses it with the same message",
    ("agent/persona.py", "operand 'not math.isfinite(minutes)' dropped",
     "elif (isinstance(minutes, bool) or not isinstance(minutes, int | float)"):
        "equivalent: nan fails `0 <= minutes` and +-inf fails one of the two bounds, so the "
        "range check refuses them with the same message",
    ("agent/takeover.py", "0 -> 1",
     "for chat, p in pauses.items() if p.until > 0 or p.context})"):
        "equivalent: a pause's until is 0 (none), inf, or a message's or /pause's epoch time "
        "plus minutes (> 1e9); none lies in (0, 1]",
    ("controller/assignment.py", "operand 'pin is None' dropped",
     "if pin is None or pin not in usable or pin == holders.get(user):"):
        "equivalent: None is no host id, so `pin not in usable` skips it too",
    ("controller/assignment.py", "operand 'holder is not None' dropped",
     "if user not in plan and holder is not None and holder in usable:"):
        "equivalent: None is no host id, so `holder in usable` is False for it too",
    ("wabridge/config.py", "regex: '^' removed at 0", _PG_URL_RULE):
        "equivalent: re.match anchors at the start anyway",
    ("wabridge/config.py", "regex: '+' -> '*' at 6", _PG_URL_RULE):
        "equivalent: the line before has made sure the URL starts with postgresql:// or "
        "postgres://, so the scheme is never empty",
    ("wabridge/config.py", "regex: '*' -> '+' at 22", _PG_URL_RULE):
        "accepted: differs only for an empty password ('user:@host'), which carries no secret",
    ("wabridge/units.py", "'' -> 'XX'", 'epoch = environ.get(LEASE_EPOCH_ENV, "")'):
        "equivalent: a missing epoch is refused by `not epoch.isdigit()`, and 'XX' is no "
        "digits either",
    ("controller/slots.py", "0 -> 1",
     "self.peak = 0  # most slots held at once (diagnostics, tests)"):
        "accepted: peak is a diagnostic only tests read, after slots were held (max() with "
        "the first count of 1 or more gives the same value)",
}


@dataclass(frozen=True)
class Mutant:
    module: str
    index: int  # position of the edited node in ast.walk order
    kind: str
    description: str
    line: int
    source: str  # the original source line, stripped
    apply: Callable[[ast.AST], None] = field(repr=False, compare=False)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.module, self.description, self.source)


# --- which nodes are not mutated --------------------------------------------------------------


def _skipped_nodes(tree: ast.Module) -> set[int]:
    """ids of nodes whose mutation means nothing at run time, or is a declaration rather than
    a decision: docstrings, annotations, decorators (``@dataclass(frozen=True)``), imports,
    ``Literal[...]`` aliases, ``cast``/``TypeVar`` names, f-string format specs, the
    ``if __name__ == "__main__"`` entry point."""
    skip: set[int] = set()

    def mark(node: ast.AST | None) -> None:
        if node is not None:
            skip.update(id(n) for n in ast.walk(node))

    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                mark(body[0])
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            for deco in node.decorator_list:  # @dataclass(frozen=True): a declaration
                mark(deco)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            mark(node.returns)
            for arg in [*node.args.args, *node.args.kwonlyargs, *node.args.posonlyargs,
                        node.args.vararg, node.args.kwarg]:
                if arg is not None:
                    mark(arg.annotation)
        if isinstance(node, ast.AnnAssign):
            mark(node.annotation)
        if isinstance(node, ast.Import | ast.ImportFrom):
            mark(node)
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) \
                and node.value.id == "Literal":
            mark(node)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in ("cast", "TypeVar"):
            mark(node.args[0] if node.args else None)
        if isinstance(node, ast.Assign) and (_is_type_union(node.value) or (
                isinstance(node.value, ast.Subscript) and isinstance(node.value.value, ast.Name)
                and node.value.value.id in _GENERIC_TYPES)):
            mark(node)  # ``Action = Claim | Start | ...``, ``Check = Callable[...]``: types
        if isinstance(node, ast.FormattedValue):
            mark(node.format_spec)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare) \
                and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__":
            mark(node)  # the ``python -m`` entry point
    return skip


_GENERIC_TYPES = frozenset({"Callable", "Literal", "Mapping", "Sequence", "Union", "Optional",
                            "dict", "list", "tuple", "set", "frozenset", "type"})


def _is_type_union(node: ast.expr) -> bool:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return all(isinstance(side, ast.Name | ast.Attribute) or _is_type_union(side)
                   for side in (node.left, node.right))
    return False


def _regex_nodes(tree: ast.Module) -> set[int]:
    """ids of string constants used as regular expressions: ``re.compile/sub/match...``'s
    first argument and ``_matches``' (config's pattern rules)."""
    found: set[int] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        is_re = isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) \
            and func.value.id == "re"
        if (is_re and name in ("compile", "sub", "match", "fullmatch", "search", "split")) \
                or name == "_matches":
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                found.add(id(first))
    return found


# --- regex mutations ---------------------------------------------------------------------------


def _regex_tokens(pattern: str) -> list[str]:
    tokens: list[str] = []
    i = 0
    while i < len(pattern):
        if pattern[i] == "\\" and i + 1 < len(pattern):
            tokens.append(pattern[i : i + 2])
            i += 2
        else:
            tokens.append(pattern[i])
            i += 1
    return tokens


def _match_only(tree: ast.Module) -> set[int]:
    """ids of the pattern constants of module-level ``NAME = re.compile(...)`` whose every use
    is ``NAME.match(...)``: re.match anchors at the start, so their '^' is no decision."""
    compiled: dict[str, int] = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 \
                and isinstance(stmt.targets[0], ast.Name) and isinstance(stmt.value, ast.Call) \
                and isinstance(stmt.value.func, ast.Attribute) \
                and stmt.value.func.attr == "compile" and stmt.value.args:
            compiled[stmt.targets[0].id] = id(stmt.value.args[0])
    uses: dict[str, set[str]] = {name: set() for name in compiled}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id in uses:
            uses[node.value.id].add(node.attr)
        elif isinstance(node, ast.Name) and node.id in uses and isinstance(node.ctx, ast.Load):
            uses[node.id].add("")  # passed around: anything may be done with it
    attr_names = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    for node in ast.walk(tree):  # a bare Load that is not the base of an attribute
        if isinstance(node, ast.Name) and node.id in uses and id(node) not in attr_names \
                and isinstance(node.ctx, ast.Load):
            uses[node.id].add("?")
    return {compiled[name] for name, attrs in uses.items() if attrs - {""} == {"match"}}


def regex_mutants(pattern: str, match_only: bool = False) -> list[tuple[str, str]]:
    """(new pattern, description) pairs: each still compiles and differs from ``pattern``.
    ``match_only``: the pattern is only used with re.match, so a leading '^' is kept."""
    toks = _regex_tokens(pattern)
    out: list[tuple[str, str]] = []

    def with_tok(i: int, new: str, what: str) -> None:
        out.append(("".join([*toks[:i], new, *toks[i + 1 :]]), f"{what} at {i}"))

    depth_class = False
    for i, tok in enumerate(toks):
        prev = toks[i - 1] if i else ""
        if depth_class:
            if tok == "]":
                depth_class = False
            continue
        if tok == "[":
            depth_class = True
            if i + 1 < len(toks) and toks[i + 1] == "^":
                out.append(("".join([*toks[: i + 1], *toks[i + 2 :]]), f"class un-negated at {i}"))
            else:
                with_tok(i, "[^", "class negated")
            continue
        if tok == "+" and prev not in ("(", "?"):
            with_tok(i, "*", "'+' -> '*'")
        elif tok == "*" and prev not in ("(", "?", ""):
            with_tok(i, "+", "'*' -> '+'")
        elif tok == "?" and prev not in ("(", ""):
            with_tok(i, "", "'?' removed")
        elif tok == "^" and i == 0 and not match_only:
            with_tok(i, "", "'^' removed")
        elif tok == "$" and i == len(toks) - 1:
            with_tok(i, "", "'$' removed")
        elif tok in ("\\d", "\\w", "\\s"):
            swap = {"\\d": "\\w", "\\w": "\\d", "\\s": "\\S"}[tok]
            with_tok(i, swap, f"{tok} -> {swap}")
        elif tok == "{":
            close = toks.index("}", i)
            body = "".join(toks[i + 1 : close])
            m = re.fullmatch(r"(\d+)(?:,(\d+))?", body)
            if m:
                low, high = int(m.group(1)), m.group(2)
                rest = "".join(toks[close + 1 :])
                head = "".join(toks[:i])
                if high is None:
                    out.append((f"{head}{{{low + 1}}}{rest}", f"{{{low}}} -> {{{low + 1}}}"))
                else:
                    out.append((f"{head}{{{low + 1},{high}}}{rest}",
                                f"{{{body}}} -> {{{low + 1},{high}}}"))
                    if int(high) > low:
                        out.append((f"{head}{{{low},{int(high) - 1}}}{rest}",
                                    f"{{{body}}} -> {{{low},{int(high) - 1}}}"))
        elif tok == "(" and toks[i + 1 : i + 3] == ["?", "<"] and i + 3 < len(toks) \
                and toks[i + 3] in "!=":
            flip = "=" if toks[i + 3] == "!" else "!"
            out.append(("".join([*toks[: i + 3], flip, *toks[i + 4 :]]),
                        f"lookbehind flipped at {i}"))
        elif tok == "(" and i + 2 < len(toks) and toks[i + 1] == "?" and toks[i + 2] in "!=":
            flip = "=" if toks[i + 2] == "!" else "!"
            out.append(("".join([*toks[: i + 2], flip, *toks[i + 3 :]]),
                        f"lookahead flipped at {i}"))
    # top-level alternatives: drop each
    depth, in_class, starts = 0, False, [0]
    for i, tok in enumerate(toks):
        if in_class:
            in_class = tok != "]"
        elif tok == "[":
            in_class = True
        elif tok == "(":
            depth += 1
        elif tok == ")":
            depth -= 1
        elif tok == "|" and depth == 0:
            starts.append(i + 1)
    if len(starts) > 1:
        bounds = [*starts, len(toks) + 1]
        branches = ["".join(toks[bounds[k] : bounds[k + 1] - 1]) for k in range(len(starts))]
        for k in range(len(branches)):
            rest = "|".join(b for j, b in enumerate(branches) if j != k)
            out.append((rest, f"alternative {branches[k]!r} dropped"))
    valid = []
    for new, what in out:
        if new == pattern:
            continue
        try:
            re.compile(new)
        except re.error:
            continue
        valid.append((new, what))
    return valid


# --- mutant generation -------------------------------------------------------------------------

_CMP_SWAP: dict[type[ast.cmpop], type[ast.cmpop]] = {
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
}
_BIN_SWAP: dict[type[ast.operator], type[ast.operator]] = {
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
    ast.FloorDiv: ast.Div, ast.Mod: ast.FloorDiv,
}
_OP_TEXT = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==",
            ast.NotEq: "!=", ast.In: "in", ast.NotIn: "not in", ast.Is: "is",
            ast.IsNot: "is not", ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/",
            ast.FloorDiv: "//", ast.Mod: "%", ast.BitOr: "|", ast.BitAnd: "&",
            ast.And: "and", ast.Or: "or"}


def _short(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _parents(tree: ast.AST) -> dict[int, tuple[ast.AST, str, int | None]]:
    """id(child) -> (parent, field, index in the field's list or None)."""
    out: dict[int, tuple[ast.AST, str, int | None]] = {}
    for parent in ast.walk(tree):
        for name, value in ast.iter_fields(parent):
            if isinstance(value, list):
                for k, item in enumerate(value):
                    if isinstance(item, ast.AST):
                        out[id(item)] = (parent, name, k)
            elif isinstance(value, ast.AST):
                out[id(value)] = (parent, name, None)
    return out


def _replace(tree: ast.AST, node: ast.AST, new: ast.AST) -> None:
    parent, name, k = _parents(tree)[id(node)]
    if k is None:
        setattr(parent, name, new)
    else:
        getattr(parent, name)[k] = new


def _is_table(node: ast.List | ast.Tuple | ast.Set) -> bool:
    return len(node.elts) >= 1 and all(
        isinstance(e, ast.Constant | ast.Name | ast.Attribute) for e in node.elts)


def mutants_of(module: str, source: str) -> list[Mutant]:
    tree = ast.parse(source)
    lines = source.splitlines()
    skip = _skipped_nodes(tree)
    regexes = _regex_nodes(tree)
    match_only = _match_only(tree)
    nodes = list(ast.walk(tree))
    found: list[Mutant] = []

    seen: dict[tuple[str, int], int] = {}

    def add(index: int, node: ast.AST, kind: str, description: str,
            apply: Callable[[ast.AST], None]) -> None:
        line = getattr(node, "lineno", 0)
        # the same edit twice on one line (two 1s): number the later ones, so that each
        # mutant has its own key in EXPLAINED
        n = seen[description, line] = seen.get((description, line), 0) + 1
        found.append(Mutant(module, index, kind, description if n == 1 else f"{description} #{n}",
                            line, lines[line - 1].strip() if line else "", apply))

    def at(index: int) -> Callable[[Callable[[ast.AST, ast.AST], None]], Callable[[ast.AST], None]]:
        """Wrap an edit of the node at ``index`` into an edit of a fresh copy of the tree."""
        def wrap(edit: Callable[[ast.AST, ast.AST], None]) -> Callable[[ast.AST], None]:
            def apply(tree_copy: ast.AST) -> None:
                edit(tree_copy, list(ast.walk(tree_copy))[index])
            return apply
        return wrap

    for i, node in enumerate(nodes):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Compare):
            for k, op in enumerate(node.ops):
                new_op = _CMP_SWAP.get(type(op))
                if new_op is None:
                    continue

                def edit(_t: ast.AST, n: ast.AST, k: int = k, new_op: type = new_op) -> None:
                    n.ops[k] = new_op()  # type: ignore[attr-defined]
                add(i, node, "comparison", f"{_OP_TEXT[type(op)]} -> {_OP_TEXT[new_op]}",
                    at(i)(edit))
        elif isinstance(node, ast.BinOp | ast.AugAssign):
            new_bin = _BIN_SWAP.get(type(node.op))
            if new_bin is not None:
                def edit_op(_t: ast.AST, n: ast.AST, new_bin: type = new_bin) -> None:
                    n.op = new_bin()  # type: ignore[attr-defined]
                add(i, node, "operator", f"{_OP_TEXT[type(node.op)]} -> {_OP_TEXT[new_bin]}",
                    at(i)(edit_op))
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Sub | ast.BitOr
                                                          | ast.BitAnd):
                def drop_right(t: ast.AST, n: ast.AST) -> None:
                    _replace(t, n, n.left)  # type: ignore[attr-defined]
                add(i, node, "operand", f"'{_OP_TEXT[type(node.op)]} "
                    f"{_short(ast.unparse(node.right), 30)}' dropped", at(i)(drop_right))
        elif isinstance(node, ast.BoolOp):
            other = ast.Or if isinstance(node.op, ast.And) else ast.And

            def edit_bool(_t: ast.AST, n: ast.AST, other: type = other) -> None:
                n.op = other()  # type: ignore[attr-defined]
            add(i, node, "boolean", f"{_OP_TEXT[type(node.op)]} -> {_OP_TEXT[other]}",
                at(i)(edit_bool))
            for k, operand in enumerate(node.values):
                def drop(_t: ast.AST, n: ast.AST, k: int = k) -> None:
                    del n.values[k]  # type: ignore[attr-defined]
                    if len(n.values) == 1:  # type: ignore[attr-defined]
                        _replace(_t, n, n.values[0])  # type: ignore[attr-defined]
                add(i, node, "boolean", f"operand {_short(ast.unparse(operand), 40)} dropped",
                    at(i)(drop))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not | ast.USub):
            def unwrap(t: ast.AST, n: ast.AST) -> None:
                _replace(t, n, n.operand)  # type: ignore[attr-defined]
            what = "not" if isinstance(node.op, ast.Not) else "unary -"
            add(i, node, "negation", f"'{what}' removed", at(i)(unwrap))
        elif isinstance(node, ast.Constant):
            value = node.value
            if id(node) in regexes:
                for new, what in regex_mutants(str(value), id(node) in match_only):
                    def set_re(_t: ast.AST, n: ast.AST, new: str = new) -> None:
                        n.value = new  # type: ignore[attr-defined]
                    add(i, node, "regex", f"regex: {what}", at(i)(set_re))
                continue
            new_value: object
            if isinstance(value, bool):
                new_value = not value
            elif isinstance(value, int):
                new_value = value + 1
            elif isinstance(value, float):
                new_value = value + 1.0 if value < 1.0 else value * 2
            elif isinstance(value, str):
                new_value = f"XX{value}XX" if value else "XX"
            else:
                continue

            def set_const(_t: ast.AST, n: ast.AST, new_value: object = new_value) -> None:
                n.value = new_value  # type: ignore[attr-defined]
            add(i, node, "constant", f"{_short(value)} -> {_short(new_value)}", at(i)(set_const))
        elif isinstance(node, ast.Dict):
            for k, key in enumerate(node.keys):
                def del_item(_t: ast.AST, n: ast.AST, k: int = k) -> None:
                    del n.keys[k]  # type: ignore[attr-defined]
                    del n.values[k]  # type: ignore[attr-defined]
                label = ast.unparse(key) if key is not None else "**"
                add(i, node, "table", f"entry {_short(label, 40)} removed", at(i)(del_item))
        elif isinstance(node, ast.List | ast.Tuple | ast.Set) and _is_table(node) \
                and not isinstance(getattr(node, "ctx", None), ast.Store):
            for k, elt in enumerate(node.elts):
                def del_elt(_t: ast.AST, n: ast.AST, k: int = k) -> None:
                    del n.elts[k]  # type: ignore[attr-defined]
                add(i, node, "table", f"entry {_short(ast.unparse(elt), 40)} removed",
                    at(i)(del_elt))
        elif (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)) \
                or isinstance(node, ast.Continue | ast.Break):
            def to_pass(t: ast.AST, n: ast.AST) -> None:
                _replace(t, n, ast.Pass())
            add(i, node, "statement", f"'{_short(ast.unparse(node), 50)}' removed",
                at(i)(to_pass))
    return found


# --- running a mutant --------------------------------------------------------------------------


class _MutantFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves one module from a compiled (mutated) code object instead of its file."""

    def __init__(self, name: str, path: Path, code: types.CodeType) -> None:
        self.name, self.path, self.code = name, path, code

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: types.ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.name:
            return None
        return importlib.util.spec_from_loader(fullname, self, origin=str(self.path))

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        module.__file__ = str(self.path)
        exec(self.code, module.__dict__)  # noqa: S102 - the mutant under test


def _module_name(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


def _forget_project_modules() -> None:
    """Drop every module loaded from this repository so the child imports them afresh (and
    the mutated one through the finder); third-party modules stay loaded."""
    root = str(REPO)
    for name, mod in list(sys.modules.items()):
        file = getattr(mod, "__file__", None) or ""
        if file.startswith(root) and name != __name__:
            del sys.modules[name]


def _spawn(module: str, tests: list[str], code: types.CodeType | None, timeout: float) -> int:
    pid = os.fork()
    if pid:
        return pid
    try:  # the child: never returns
        signal.alarm(int(timeout) + 5)  # outlives no parent that was killed
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        _forget_project_modules()
        if code is not None:
            sys.meta_path.insert(0, _MutantFinder(_module_name(module), REPO / module, code))
        import pytest  # noqa: PLC0415 - imported by the parent already

        rc = pytest.main([*PYTEST_ARGS, *tests])
        os._exit(int(rc))
    except BaseException:  # noqa: BLE001 - any failure of the child counts as "killed"
        os._exit(99)


@dataclass
class Outcome:
    status: str  # killed, survived, timeout
    seconds: float


def run_all(jobs: list[tuple[str, list[str], types.CodeType | None]], timeout: list[float],
            parallel: int, on_done: Callable[[int, Outcome], None]) -> None:
    """Run ``jobs`` at most ``parallel`` at a time; report each one's outcome."""
    pending = list(enumerate(jobs))
    running: dict[int, tuple[int, float]] = {}  # pid -> (job index, start)
    while pending or running:
        while pending and len(running) < parallel:
            k, (module, tests, code) = pending.pop(0)
            running[_spawn(module, tests, code, timeout[k])] = (k, time.monotonic())
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            now = time.monotonic()
            for child, (k, start) in list(running.items()):
                if now - start > timeout[k]:
                    os.kill(child, signal.SIGKILL)
                    os.waitpid(child, 0)
                    del running[child]
                    on_done(k, Outcome("timeout", now - start))
            time.sleep(0.005)
            continue
        k, start = running.pop(pid)
        rc = os.waitstatus_to_exitcode(status)
        on_done(k, Outcome("survived" if rc == 0 else "killed", time.monotonic() - start))


def _file(test: str) -> str:
    """The file of a ``MODULES`` entry: a test file, or one test of it (``file::name``)."""
    return test.partition("::")[0]


def _preload(paths: list[str]) -> None:
    """Import, in this parent, the third-party modules the tests and modules use, so each
    forked child starts with them loaded."""
    import pytest  # noqa: F401, PLC0415

    # pytest rewrites the asserts of every module of a plugin's distribution (all of
    # hypothesis, anyio...) when it imports them: seconds in every child. Loaded here once,
    # they are only named (PytestAssertRewriteWarning, ignored in PYTEST_ARGS).
    plugins = [e.value.split(":")[0] for e in importlib.metadata.entry_points(group="pytest11")]
    for name in [*plugins, "hypothesis", "hypothesis.strategies"]:  # hypothesis's: lazily
        with contextlib.suppress(ImportError):
            importlib.import_module(name)

    project = {"wabridge", "agent", "controller", "sim", "tests", "bench", "conftest",
               "firestore_emulator", "fleet", "harness", "fakes"}
    for path in paths:
        tree = ast.parse((REPO / _file(path)).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            for name in names:
                # pytest plugins are left to pytest (it rewrites their asserts on import)
                top = name.split(".")[0]
                if top not in project and not top.startswith(("__", "pytest_", "_pytest")):
                    with contextlib.suppress(ImportError):
                        importlib.import_module(name)


@dataclass
class ModuleReport:
    module: str
    tests: list[str]
    baseline_seconds: float = 0.0
    mutant_seconds: float = 0.0  # the mutants' test runs, added up
    mutants: int = 0
    killed: int = 0
    timeouts: int = 0
    survived: int = 0
    score: float = 0.0
    score_without_equivalent: float = 0.0
    survivors: list[dict[str, object]] = field(default_factory=list)
    by_kind: dict[str, list[int]] = field(default_factory=dict)  # kind -> [total, killed]


def _iter_selected(names: list[str]) -> Iterator[str]:
    for name in names or list(MODULES):
        if name not in MODULES:
            raise SystemExit(f"unknown module {name!r}; one of: {', '.join(MODULES)}")
        yield name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("modules", nargs="*", help="module paths (default: all of MODULES)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = parser.parse_args(argv)
    os.chdir(REPO)
    sys.path.insert(0, str(REPO))
    selected = list(_iter_selected(args.modules))
    for module in selected:  # a test file named here but not written (yet) is left out
        MODULES[module] = [t for t in MODULES[module] if (REPO / _file(t)).exists()]

    generated: dict[str, list[Mutant]] = {}
    for module in selected:
        generated[module] = mutants_of(module, (REPO / module).read_text(encoding="utf-8"))
    if args.list:
        for module, muts in generated.items():
            for m in muts:
                print(f"{module}:{m.line}: [{m.kind}] {m.description}    | {m.source}")
        print(sum(len(m) for m in generated.values()), "mutants")
        return 0

    # An explanation whose mutant no longer exists (the line changed) is stale: say so.
    known = {m.key for muts in generated.values() for m in muts}
    stale = sorted(k for k in EXPLAINED if k[0] in generated and k not in known)
    for key in stale:
        print(f"stale explanation (no such mutant any more): {key}", file=sys.stderr)

    started = time.monotonic()
    # Every child imports the project's modules and pytest's rewritten test files afresh:
    # let them share compiled bytecode (the venv's environment may say not to write it),
    # kept out of the worktree.
    sys.dont_write_bytecode = False
    sys.pycache_prefix = str(Path(tempfile.gettempdir()) / "wabridge-mutate-pycache")
    _preload([*selected, *{t for m in selected for t in MODULES[m]}])
    reports = {m: ModuleReport(m, MODULES[m]) for m in selected}

    # Baselines: the unmutated tests must pass; their time sets each mutant's timeout.
    base_jobs: list[tuple[str, list[str], types.CodeType | None]] = [
        (m, MODULES[m], None) for m in selected]
    failed: list[str] = []

    def base_done(k: int, outcome: Outcome) -> None:
        reports[selected[k]].baseline_seconds = round(outcome.seconds, 2)
        if outcome.status != "survived":
            failed.append(selected[k])

    run_all(base_jobs, [300.0] * len(base_jobs), args.jobs, base_done)
    if failed:
        print("the tests fail without any mutant:", ", ".join(failed), file=sys.stderr)
        return 1

    jobs: list[tuple[str, list[str], types.CodeType | None]] = []
    index: list[Mutant] = []
    timeouts: list[float] = []
    for module, muts in generated.items():
        tree = ast.parse((REPO / module).read_text(encoding="utf-8"))
        for m in muts:
            mutated = copy.deepcopy(tree)
            m.apply(mutated)
            ast.fix_missing_locations(mutated)
            try:
                code = compile(mutated, str(REPO / module), "exec")
            except (SyntaxError, ValueError, TypeError):
                continue  # not a program: not a mutant
            jobs.append((module, MODULES[module], code))
            index.append(m)
            # generous: a machine shared with other jobs must not turn a slow run into a kill
            timeouts.append(max(30.0, 8 * reports[module].baseline_seconds))
            reports[module].mutants += 1

    done = 0

    def mutant_done(k: int, outcome: Outcome) -> None:
        nonlocal done
        done += 1
        m = index[k]
        rep = reports[m.module]
        rep.mutant_seconds = round(rep.mutant_seconds + outcome.seconds, 1)
        kind = rep.by_kind.setdefault(m.kind, [0, 0])
        kind[0] += 1
        if outcome.status == "survived":
            print(f"  survived: {m.module}:{m.line} [{m.kind}] {m.description}",
                  file=sys.stderr, flush=True)
            rep.survived += 1
            rep.survivors.append({
                "line": m.line, "kind": m.kind, "mutation": m.description, "source": m.source,
                "explanation": EXPLAINED.get(m.key, "UNEXPLAINED")})
        else:
            kind[1] += 1
            rep.killed += outcome.status == "killed"
            rep.timeouts += outcome.status == "timeout"
        if done % 50 == 0 or done == len(jobs):
            print(f"  {done}/{len(jobs)} mutants, {time.monotonic() - started:.0f} s",
                  file=sys.stderr, flush=True)

    print(f"{len(jobs)} mutants over {len(selected)} modules, {args.jobs} at a time",
          file=sys.stderr, flush=True)
    run_all(jobs, timeouts, args.jobs, mutant_done)

    for rep in reports.values():
        rep.survivors.sort(key=lambda s: (int(str(s["line"])), str(s["mutation"])))
        caught = rep.killed + rep.timeouts
        rep.score = round(100 * caught / rep.mutants, 1) if rep.mutants else 100.0
        equivalent = sum(1 for s in rep.survivors
                         if str(s["explanation"]).startswith("equivalent"))
        rest = rep.mutants - equivalent
        rep.score_without_equivalent = round(100 * caught / rest, 1) if rest else 100.0
    elapsed = time.monotonic() - started
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "command": " ".join(["python -m bench.mutate", *args.modules]),
        "when": stamp, "seconds": round(elapsed, 1), "jobs": args.jobs,
        "pytest_args": PYTEST_ARGS,
        "stale_explanations": [list(k) for k in stale],
        "modules": {m: asdict(r) for m, r in reports.items()},
    }
    (out / f"mutate-{stamp}.json").write_text(json.dumps(result, indent=1) + "\n",
                                              encoding="utf-8")
    summary = _summary(result)
    (out / f"mutate-{stamp}.md").write_text(summary, encoding="utf-8")
    print(summary)
    unexplained = sum(1 for r in reports.values() for s in r.survivors
                      if s["explanation"] == "UNEXPLAINED")
    low = [m for m, r in reports.items() if r.score < 95.0]
    return 1 if unexplained or low else 0


def _summary(result: dict[str, object]) -> str:
    modules = cast("dict[str, dict[str, Any]]", result["modules"])
    lines = [f"# Mutation testing ({result['when']})", "",
             f"`{result['command']}`: {result['seconds']} s, {result['jobs']} at a time. "
             "Score = mutants the tests catch (fail or time out) / all mutants; "
             "'w/o equivalent' leaves out the survivors no test could tell apart.", "",
             "| module | mutants | caught | survived | score | w/o equivalent | test s | tests |",
             "|---|---|---|---|---|---|---|---|"]
    for name, rep in modules.items():
        lines.append(f"| `{name}` | {rep['mutants']} | {rep['killed'] + rep['timeouts']} | "
                     f"{rep['survived']} | {rep['score']} % | {rep['score_without_equivalent']} % "
                     f"| {rep['mutant_seconds']} | {', '.join(rep['tests'])} |")
    for name, rep in modules.items():
        if not rep["survivors"]:
            continue
        lines += ["", f"## Survivors in `{name}`", ""]
        for s in rep["survivors"]:
            lines.append(f"- line {s['line']} [{s['kind']}] {s['mutation']} — `{s['source']}`  ")
            lines.append(f"  {s['explanation']}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
