"""Reply shaping: Claude's Markdown -> WhatsApp formatting, and splitting long replies.

Pure functions, table-tested. WhatsApp knows ``*bold*``, ``_italic_``, ``~strike~`` and
```` ``` ```` code blocks; it has no headings, tables or link syntax.
"""

from __future__ import annotations

import re

_FENCE = re.compile(r"^```")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
_BOLD = re.compile(r"\*\*(.+?)\*\*|__(.+?)__")
_STRIKE = re.compile(r"~~(.+?)~~")
_ITALIC_STAR = re.compile(r"(?<![*\w])\*(?!\s)([^*\n]+?)(?<!\s)\*(?![*\w])")
_LINK = re.compile(r"\[([^\]]+)\]\((\S+?)\)")
_TABLE_RULE = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")


def _inline(line: str) -> str:
    line = _LINK.sub(lambda m: m.group(1) if m.group(1) == m.group(2) else
                     f"{m.group(1)} ({m.group(2)})", line)
    line = _ITALIC_STAR.sub(r"_\1_", line)
    line = _BOLD.sub(lambda m: f"*{m.group(1) or m.group(2)}*", line)
    return _STRIKE.sub(r"~\1~", line)


def _table_row(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def to_whatsapp(markdown: str) -> str:
    out: list[str] = []
    in_code = False
    header: list[str] | None = None
    for line in markdown.splitlines():
        if _FENCE.match(line.strip()):
            in_code = not in_code
            out.append("```")
            continue
        if in_code:
            out.append(line)
            continue
        stripped = line.strip()
        if stripped.startswith("|") and stripped.count("|") >= 2:
            if _TABLE_RULE.match(stripped):
                continue
            cells = [_inline(c) for c in _table_row(stripped)]
            if header is None:
                header = cells
                continue
            pairs = [f"{h}: {c}" if h else c for h, c in zip(header, cells, strict=False)]
            out.append("• " + ", ".join(pairs))
            continue
        if header is not None:
            header = None
        heading = _HEADING.match(line)
        if heading:
            out.append(f"*{_inline(heading.group(1)).replace('*', '')}*")
            continue
        out.append(_inline(line))
    if header is not None and out and not out[-1].startswith("•"):
        out.append("• " + ", ".join(header))
    return "\n".join(out).strip()


def _units(text: str) -> list[str]:
    """Split into paragraphs, keeping code blocks whole."""
    units: list[str] = []
    current: list[str] = []
    in_code = False
    for line in text.split("\n"):
        if line.strip().startswith("```"):
            in_code = not in_code
        if not in_code and line.strip() == "" and current:
            units.append("\n".join(current))
            current = []
            continue
        current.append(line)
    if current:
        units.append("\n".join(current))
    return [u for u in units if u.strip()]


_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def split(text: str, limit: int) -> list[str]:
    """Split ``text`` into messages of at most ``limit`` characters, on paragraph, then
    sentence, then word boundaries; a code block is never cut unless it alone exceeds the
    limit (then it is cut on line boundaries and each piece re-fenced)."""
    if len(text) <= limit:
        return [text]
    pieces: list[str] = []
    for unit in _units(text):
        if len(unit) <= limit:
            pieces.append(unit)
        elif unit.lstrip().startswith("```"):
            body = unit.strip().strip("`").split("\n")
            chunk: list[str] = []
            for line in body:
                if len("\n".join([*chunk, line])) + 8 > limit and chunk:
                    pieces.append("```\n" + "\n".join(chunk) + "\n```")
                    chunk = []
                chunk.append(line[: limit - 8])
            if chunk:
                pieces.append("```\n" + "\n".join(chunk) + "\n```")
        else:
            words: list[str] = []
            for sentence in _SENTENCE.split(unit):
                words.extend([sentence] if len(sentence) <= limit else sentence.split(" "))
            line = ""
            for word in words:
                candidate = f"{line} {word}".strip()
                if len(candidate) > limit and line:
                    pieces.append(line)
                    line = word[:limit]
                else:
                    line = candidate[:limit]
            if line:
                pieces.append(line)
    messages: list[str] = []
    for piece in pieces:
        if messages and len(messages[-1]) + 2 + len(piece) <= limit:
            messages[-1] += "\n\n" + piece
        else:
            messages.append(piece)
    return messages
