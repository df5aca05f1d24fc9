"""Reply shaping: Claude's Markdown -> WhatsApp formatting, and splitting long replies.

Pure functions, table-tested. WhatsApp knows ``*bold*``, ``_italic_``, ``~strike~`` and
```` ``` ```` code blocks; it has no headings, tables or link syntax.
"""

from __future__ import annotations

import re

_FENCE = re.compile(r"^```")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
_BOLD_ITALIC = re.compile(r"\*\*\*(?!\s)(.+?)(?<!\s)\*\*\*")
# ``__x__`` is strong only at word boundaries (CommonMark): ``a__b__c`` stays as it is.
_BOLD = re.compile(r"\*\*(.+?)\*\*|(?<!\w)__(?!\s)(.+?)(?<!\s)__(?!\w)")
_STRIKE = re.compile(r"~~(.+?)~~")
_ITALIC_STAR = re.compile(r"(?<![*\w])\*(?!\s)([^*\n]+?)(?<!\s)\*(?![*\w])")
_LINK = re.compile(r"\[([^\]]+)\]\((\S+?)\)")
_TABLE_RULE = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")
_CODE_SPAN = re.compile(r"`[^`\n]+`")
_URL = re.compile(r"https?://[^\s()]+")
_HOLE = re.compile("\ue000(\\d+)\ue001")  # placeholder for text that must stay verbatim
_PLACEHOLDER_CHARS = re.compile("[\ue000\ue001]")


def _inline(line: str) -> str:
    # Inline code and URLs are kept verbatim: ``__init__`` or ``*args`` in them is not markup.
    kept: list[str] = []

    def hold(m: re.Match[str]) -> str:
        kept.append(m.group(0))
        return f"\ue000{len(kept) - 1}\ue001"

    line = _PLACEHOLDER_CHARS.sub(hold, line)  # the text's own U+E000/U+E001 come back as is
    line = _CODE_SPAN.sub(hold, line)
    line = _LINK.sub(lambda m: m.group(1) if m.group(1) == m.group(2) else
                     f"{m.group(1)} ({m.group(2)})", line)
    line = _URL.sub(hold, line)
    line = _ITALIC_STAR.sub(r"_\1_", line)  # before bold, whose output looks like *italic*
    line = _BOLD_ITALIC.sub(r"*_\1_*", line)
    line = _BOLD.sub(lambda m: f"*{m.group(1) or m.group(2)}*", line)
    line = _STRIKE.sub(r"~\1~", line)
    return _HOLE.sub(lambda m: kept[int(m.group(1))], line)


def _table_row(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def to_whatsapp(markdown: str) -> str:
    out: list[str] = []
    in_code = False
    header: list[str] | None = None
    has_rows = False  # the current table has body rows

    def end_table() -> None:
        nonlocal header
        if header is not None and not has_rows:  # a header alone: keep its text
            out.append("• " + ", ".join(header))
        header = None

    for line in markdown.splitlines():
        if _FENCE.match(line.strip()):
            end_table()
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
                header, has_rows = cells, False
                continue
            # a row shorter than its header prints what it has; cells past the header are
            # kept bare (nothing a reply says is dropped)
            pairs = [f"{h}: {c}" if h else c for h, c in zip(header, cells, strict=False)]
            out.append("• " + ", ".join([*pairs, *cells[len(header):]]))
            has_rows = True
            continue
        end_table()
        heading = _HEADING.match(line)
        if heading:
            text = _inline(heading.group(1)).replace("*", "")
            out.append(f"*{text}*" if text else "")  # an empty heading: not a lone "**"
            continue
        out.append(_inline(line))
    end_table()
    return "\n".join(out).strip()


def _is_fence(line: str) -> bool:
    return line.strip().startswith("```")


def _units(text: str) -> list[str]:
    """Split into paragraphs; a code block (fence to fence) is always a unit of its own, kept
    whole across blank lines."""
    units: list[str] = []
    current: list[str] = []
    in_code = False

    def flush() -> None:
        if current:
            units.append("\n".join(current))
            current.clear()

    for line in text.split("\n"):
        if _is_fence(line):
            if not in_code:
                flush()
            current.append(line)
            if in_code:
                flush()
            in_code = not in_code
        elif in_code:
            current.append(line)
        elif line.strip() == "":
            flush()
        else:
            current.append(line)
    flush()
    return [u for u in units if u.strip()]


_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def _chop(text: str, width: int) -> list[str]:
    """``text`` in slices of at most ``width`` characters (at least one, maybe empty)."""
    return [text[i : i + width] for i in range(0, len(text), width)] or [text]


def _split_code(unit: str, limit: int) -> list[str]:
    lines = unit.split("\n")
    opening = lines[0].strip()
    # (a lone opening fence counts as closed by itself: no body either way)
    body = lines[1:-1] if _is_fence(lines[-1]) else lines[1:]
    if len(opening) + 5 > limit // 2:  # an absurd language tag: drop it
        opening = "```"
    width = max(1, limit - len(opening) - 5)  # opening + "\n" + body + "\n```"
    pieces: list[str] = []
    chunk: list[str] = []
    for long_line in body:
        for line in _chop(long_line, width):
            if chunk and len("\n".join([*chunk, line])) > width:
                pieces.append(f"{opening}\n" + "\n".join(chunk) + "\n```")
                chunk = []
            chunk.append(line)
    if chunk or not pieces:  # an empty block is still a block
        pieces.append(f"{opening}\n" + "\n".join(chunk) + "\n```")
    return pieces


def _split_prose(unit: str, limit: int) -> list[str]:
    words: list[str] = []
    for sentence in _SENTENCE.split(unit):
        if len(sentence) <= limit:
            words.append(sentence)
        else:
            for word in sentence.split(" "):
                words.extend(_chop(word, limit))  # a word longer than a message is cut
    pieces: list[str] = []
    line = ""
    for word in words:
        candidate = f"{line} {word}".strip()
        if len(candidate) > limit and line:
            pieces.append(line)
            line = word.strip()
        else:
            line = candidate
    if line:
        pieces.append(line)
    return pieces


def split(text: str, limit: int) -> list[str]:
    """Split ``text`` into messages of at most ``limit`` characters, on paragraph, then
    sentence, then word boundaries; a code block is never cut unless it alone exceeds the
    limit (then it is cut on line boundaries and each piece re-fenced). Nothing is dropped:
    a word or code line longer than a message is cut into several."""
    if len(text) <= limit:
        return [text]
    pieces: list[str] = []
    for unit in _units(text):
        if len(unit) <= limit:
            pieces.append(unit)
        elif _is_fence(unit):  # its first line opens a code block
            pieces.extend(_split_code(unit, limit))
        else:
            pieces.extend(_split_prose(unit, limit))
    messages: list[str] = []
    for piece in pieces:
        if messages and len(messages[-1]) + 2 + len(piece) <= limit:
            messages[-1] += "\n\n" + piece
        else:
            messages.append(piece)
    return messages
