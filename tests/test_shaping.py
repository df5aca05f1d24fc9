"""Reply shaping: Markdown -> WhatsApp, and splitting long replies."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.shaping import split, to_whatsapp

F = "```"

CONVERSIONS = [
    # emphasis
    ("**bold**", "*bold*"),
    ("__bold__", "*bold*"),
    ("~~strike~~", "~strike~"),
    ("*italic*", "_italic_"),
    ("_italic_", "_italic_"),
    ("***both***", "*_both_*"),
    ("**a *b* c**", "*a _b_ c*"),
    ("*i* and **b** and ~~s~~", "_i_ and *b* and ~s~"),
    ("a * b * c", "a * b * c"),  # arithmetic, not emphasis
    ("2*3*4", "2*3*4"),
    ("snake_case_name", "snake_case_name"),
    ("a__b__c", "a__b__c"),  # intraword underscores are not markup
    ("**not closed", "**not closed"),
    # inline code and URLs stay verbatim
    ("call `__init__` with `*args*`", "call `__init__` with `*args*`"),
    ("**see `x`**", "*see `x`*"),
    ("https://example.com/a__b__c/*x*", "https://example.com/a__b__c/*x*"),
    # headings become a bold line
    ("# Title", "*Title*"),
    ("### Deeper ###", "*Deeper*"),
    ("## With **bold** inside", "*With bold inside*"),
    ("#hashtag", "#hashtag"),
    # links become text + URL
    ("[docs](https://example.com/docs)", "docs (https://example.com/docs)"),
    ("[https://x.y](https://x.y)", "https://x.y"),
    ("see [a](http://a.b) and [c](http://c.d)", "see a (http://a.b) and c (http://c.d)"),
    ("[t](https://x.y/__a__)", "t (https://x.y/__a__)"),
    # code fences kept verbatim, language tag dropped
    (f"{F}python\n**not bold** *x* # no heading\n| a | b |\n{F}",
     f"{F}\n**not bold** *x* # no heading\n| a | b |\n{F}"),
    (f"before **b**\n{F}\n~~x~~\n{F}\nafter **b**", f"before *b*\n{F}\n~~x~~\n{F}\nafter *b*"),
    # tables become bullet lines
    ("| name | age |\n|------|----:|\n| Ann | 30 |\n| Bob | 41 |",
     "• name: Ann, age: 30\n• name: Bob, age: 41"),
    ("| **k** | v |\n|---|---|\n| *x* | [l](http://u.v) |", "• *k*: _x_, v: l (http://u.v)"),
    ("intro\n\n| a | b |\n| --- | --- |\n| 1 | 2 |\n\noutro", "intro\n\n• a: 1, b: 2\n\noutro"),
    ("| a | b |\n|---|---|", "• a, b"),  # header only: its text survives
    ("| a | b |\nafter", "• a, b\nafter"),
    # plain text untouched
    ("just text.\nSecond line!", "just text.\nSecond line!"),
    ("  padded  \n", "padded"),
]


@pytest.mark.parametrize(("markdown", "whatsapp"), CONVERSIONS)
def test_to_whatsapp(markdown: str, whatsapp: str) -> None:
    assert to_whatsapp(markdown) == whatsapp


_code_line = st.text(alphabet=string.printable.replace("\n", "").replace("\r", "")
                     .replace("\x0b", "").replace("\x0c", ""), max_size=40).filter(
    lambda s: not s.strip().startswith(F)
)


@settings(max_examples=200)
@given(st.lists(_code_line, min_size=1, max_size=8), st.text(alphabet="*_~ ab", max_size=20))
def test_code_blocks_are_never_converted(lines: list[str], prose: str) -> None:
    code = "\n".join(lines)
    out = to_whatsapp(f"{prose}\n{F}\n{code}\n{F}\n{prose}")
    assert f"{F}\n{code}\n{F}" in out


_plain = st.text(alphabet=string.ascii_letters + string.digits + " .,;:!?()'\"-/\n", max_size=200)


@settings(max_examples=200)
@given(_plain)
def test_plain_text_passes_unchanged(text: str) -> None:
    assert to_whatsapp(text) == text.strip()


# --- split ---------------------------------------------------------------------------------


def _fence_lines(piece: str) -> int:
    return sum(1 for line in piece.split("\n") if line.strip().startswith(F))


def _content(text: str) -> str:
    """Non-whitespace characters outside fence lines, in order."""
    kept = [line for line in text.split("\n") if not line.strip().startswith(F)]
    return "".join("".join(kept).split())


def _check(text: str, limit: int) -> list[str]:
    pieces = split(text, limit)
    assert pieces, "nothing came out"
    for piece in pieces:
        assert len(piece) <= limit, (len(piece), piece)
        assert piece.strip(), "an empty message"
        assert _fence_lines(piece) % 2 == 0, piece
    assert _content("\n".join(pieces)) == _content(text)  # nothing lost, order kept
    return pieces


def test_short_text_is_one_message() -> None:
    assert split("hello", 10) == ["hello"]
    assert split("x" * 10, 10) == ["x" * 10]


def test_paragraphs_are_packed_up_to_the_limit() -> None:
    text = "\n\n".join(["a" * 40, "b" * 40, "c" * 40])
    assert split(text, 90) == ["a" * 40 + "\n\n" + "b" * 40, "c" * 40]


def test_sentences_then_words() -> None:
    text = "One two three. Four five six! Seven eight nine?"
    assert _check(text, 20) == ["One two three.", "Four five six!", "Seven eight nine?"]
    pieces = _check("alpha beta gamma delta epsilon", 12)
    assert pieces == ["alpha beta", "gamma delta", "epsilon"]


def test_a_word_longer_than_the_limit_is_cut_not_dropped() -> None:
    url = "https://example.com/" + "x" * 150
    pieces = _check(f"see {url} now", 100)
    assert "".join(pieces).replace(" ", "") == f"see{url}now"


def test_code_block_after_text_in_the_same_paragraph_is_not_cut() -> None:
    code = "\n".join(f"line {i} of code" for i in range(12))
    intro = "Some words to begin with " * 6
    text = f"{intro}here is the code:\n{F}python\n{code}\n{F}\nThat is all, folks. " + "More. " * 20
    pieces = _check(text, 220)
    assert any(f"{F}python\n{code}\n{F}" in p for p in pieces)


def test_code_block_longer_than_the_limit_is_cut_on_lines_and_refenced() -> None:
    lines = [f"print({i})" for i in range(60)]
    text = f"{F}py\n" + "\n".join(lines) + f"\n{F}"
    pieces = _check(text, 100)
    assert len(pieces) > 1
    for piece in pieces:
        assert piece.startswith(f"{F}py\n")
        assert piece.endswith(f"\n{F}")
    body = [line for p in pieces for line in p.split("\n")[1:-1]]
    assert body == lines


def test_code_line_longer_than_the_limit_is_wrapped() -> None:
    text = f"{F}\n" + "y" * 250 + f"\n{F}"
    pieces = _check(text, 100)
    assert "".join(p.split("\n", 1)[1].rsplit("\n", 1)[0] for p in pieces) == "y" * 250


def test_blank_lines_inside_code_do_not_split_it() -> None:
    code = "def f():\n\n    return 1\n\n\ndef g():\n    return 2"
    text = "x" * 60 + f"\n\n{F}\n{code}\n{F}\n\n" + "z" * 60
    pieces = _check(text, 80)
    assert f"{F}\n{code}\n{F}" in pieces


_word = st.text(alphabet=string.ascii_letters + string.digits + ".,!?'", min_size=1,
                max_size=12)
_long_word = st.text(alphabet="xyz", min_size=50, max_size=400)
_sentence = st.lists(_word | _long_word, min_size=1, max_size=25).map(" ".join)
_paragraph = st.lists(_sentence, min_size=1, max_size=4).map("\n".join)
_code_block = st.tuples(
    st.sampled_from(["", "python", "js"]), st.lists(_code_line, max_size=30)
).map(lambda t: f"{F}{t[0]}\n" + "\n".join(t[1]) + f"\n{F}")
_joiner = st.sampled_from(["\n\n", "\n", "\n\n\n"])


@st.composite
def _documents(draw: st.DrawFn) -> tuple[str, list[str]]:
    blocks = draw(st.lists(_paragraph | _code_block, min_size=1, max_size=8))
    out = blocks[0]
    for block in blocks[1:]:
        out += draw(_joiner) + block
    return out, [b for b in blocks if b.startswith(F)]


@settings(max_examples=400)
@given(_documents(), st.integers(min_value=30, max_value=600))
def test_split_properties(doc: tuple[str, list[str]], limit: int) -> None:
    text, code_blocks = doc
    pieces = _check(text, limit)
    for block in code_blocks:
        if len(block) <= limit:  # a code block that fits is never cut
            assert any(block in p for p in pieces), block


@settings(max_examples=300)
@given(st.lists(_word, min_size=1, max_size=200).map(" ".join), st.integers(12, 300))
def test_prose_split_keeps_the_same_words(text: str, limit: int) -> None:
    pieces = _check(text, limit)
    assert " ".join(pieces).split() == text.split()
