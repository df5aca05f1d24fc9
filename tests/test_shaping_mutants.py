"""agent.shaping: the rows mutation testing found missing (issue 20), outputs written out."""

from __future__ import annotations

import pytest

from agent.shaping import split, to_whatsapp

F = "```"


@pytest.mark.parametrize(("markdown", "whatsapp"), [
    # a row shorter than its header prints what it has; a longer one loses nothing
    ("| a | b | c |\n|---|---|---|\n| 1 | 2 |", "• a: 1, b: 2"),
    ("| a | b |\n|---|---|\n| 1 | 2 | 3 |", "• a: 1, b: 2, 3"),
    ("| a | |\n|---|---|\n| 1 | 2 |", "• a: 1, 2"),  # an empty header cell: the bare value
    # a header row followed by prose, a fence, or the end keeps its text
    ("| a | b |\n\ntext", "• a, b\n\ntext"),
    (f"| a | b |\n{F}\nx\n{F}", f"• a, b\n{F}\nx\n{F}"),
    ("| a | b |\n| 1 | 2 |\n| 3 | 4 |\n\n| c | d |", "• a: 1, b: 2\n• a: 3, b: 4\n\n• c, d"),
    # a single bar is no table; two bars are one
    ("| not a table", "| not a table"),
    ("|x|", "• x"),
    # table rules: aligned, without outer bars, with spaces
    ("| a | b |\n| :--- | ---: |\n| 1 | 2 |", "• a: 1, b: 2"),
    ("| a | b |\n|:---:|---\n| 1 | 2 |", "• a: 1, b: 2"),
    # headings: one to six #, the closing #s and spaces dropped; seven is text
    ("###### Six", "*Six*"),
    ("##### Five #####", "*Five*"),
    ("####### Seven", "####### Seven"),
    ("#  Spaced   ", "*Spaced*"),
    ("## *Star* heading", "*_Star_ heading*"),
    ("#\tTab", "*Tab*"),
    ("## a#b", "*a#b*"),
    # http and https URLs are verbatim, markup-looking parts included
    ("http://example.com/a__b__c/*x*", "http://example.com/a__b__c/*x*"),
    ("go to https://a.b/**c** now **d**", "go to https://a.b/**c** now *d*"),
    ("(https://a.b/x_y_) and _i_", "(https://a.b/x_y_) and _i_"),
    # a code span does not reach over a line end: each line is shaped alone
    ("`__a\nb__`", "`__a\nb__`"),
    ("`x` **b** `y`", "`x` *b* `y`"),
    # emphasis boundaries
    ("***x***y", "*_x_*y"),
    ("__ x__", "__ x__"),
    ("__x __", "__x __"),
    ("a__x__", "a__x__"),
    ("__x__a", "__x__a"),
    ("(__x__)", "(*x*)"),
    ("*x*y", "*x*y"),
    ("y*x*", "y*x*"),
    ("**x*", "**x*"),
    ("* x*", "* x*"),
    ("*x *", "*x *"),
    ("*a\nb*", "*a\nb*"),
    ("~~a~~ ~~b~~", "~a~ ~b~"),
    ("**a** **b**", "*a* *b*"),
    ("***a*** ***b***", "*_a_* *_b_*"),
    ("*a* *b*", "_a_ _b_"),
    ("[a](b) [c](d)", "a (b) c (d)"),
    ("[a] (b)", "[a] (b)"),
    ("[](b)", "[](b)"),
    ("[a]( b)", "[a]( b)"),
    # an unclosed fence keeps everything after it verbatim
    (f"{F}\n**x**\n# h", f"{F}\n**x**\n# h"),
    (f"  {F}js\n**x**\n  {F}  \n**y**", f"{F}\n**x**\n{F}\n*y*"),
    ("a\n\n\nb", "a\n\n\nb"),
])
def test_to_whatsapp_rows(markdown: str, whatsapp: str) -> None:
    assert to_whatsapp(markdown) == whatsapp


def test_a_long_code_block_without_its_closing_fence_keeps_every_line() -> None:
    text = f"{F}\n" + "\n".join(f"line {i:02d}" for i in range(12))  # never closed
    # 40 - len("```") - 5 leaves 32 characters of body a piece: four 7-character lines
    assert split(text, 40) == [
        f"{F}\nline 00\nline 01\nline 02\nline 03\n{F}",
        f"{F}\nline 04\nline 05\nline 06\nline 07\n{F}",
        f"{F}\nline 08\nline 09\nline 10\nline 11\n{F}",
    ]


def test_a_closed_long_code_block_is_refenced_exactly() -> None:
    text = f"{F}py\n" + "\n".join(f"line {i:02d}" for i in range(6)) + f"\n{F}"
    assert split(text, 40) == [
        f"{F}py\nline 00\nline 01\nline 02\n{F}",
        f"{F}py\nline 03\nline 04\nline 05\n{F}",
    ]


def test_an_absurd_language_tag_is_dropped() -> None:
    text = f"{F}{'x' * 30}\n" + "\n".join(["abcdefgh"] * 6) + f"\n{F}"
    assert split(text, 40) == [
        f"{F}\nabcdefgh\nabcdefgh\nabcdefgh\n{F}",
        f"{F}\nabcdefgh\nabcdefgh\nabcdefgh\n{F}",
    ]


def test_a_tag_that_fits_half_the_limit_is_kept() -> None:
    tag = "x" * 15  # "```" + 15 + 5 = 23 > 40 // 2: dropped; 14 is kept
    kept = "y" * 12
    assert split(f"{F}{kept}\n" + "ab\n" * 20 + F, 40)[0].startswith(f"{F}{kept}\n")
    assert split(f"{F}{tag}\n" + "ab\n" * 20 + F, 40)[0].startswith(f"{F}\nab")


@pytest.mark.parametrize(("text", "limit", "pieces"), [
    # sentences end at ".", "!" and "?"; then whole sentences are packed
    ("A b? C d e f g.", 12, ["A b?", "C d e f g."]),
    ("A b! C d e f g.", 12, ["A b!", "C d e f g."]),
    ("A b. C d e f g.", 12, ["A b.", "C d e f g."]),
    ("A b, C d e f g.", 12, ["A b, C d e f", "g."]),  # a comma is not a sentence end
    # exactly the limit fits; one more does not
    ("aaaa bbbb", 9, ["aaaa bbbb"]),
    ("aaaa bbbbb", 9, ["aaaa", "bbbbb"]),
    ("abcdefghij", 4, ["abcd", "efgh", "ij"]),
    # paragraphs join with a blank line while they fit exactly
    ("aaaa\n\nbbbb\n\ncccc", 10, ["aaaa\n\nbbbb", "cccc"]),
    ("aaa\n\nbbb\n\nccc", 12, ["aaa\n\nbbb", "ccc"]),
    ("aaa\n\n\n\nbbb\n \nccc", 9, ["aaa\n\nbbb", "ccc"]),
])
def test_split_rows(text: str, limit: int, pieces: list[str]) -> None:
    assert split(text, limit) == pieces


def test_a_code_block_in_a_paragraph_is_its_own_unit() -> None:
    text = f"intro words\n{F}\ncode\n{F}\noutro words"
    assert split(text, 20) == ["intro words", f"{F}\ncode\n{F}", "outro words"]


def test_code_lines_wrap_at_the_width_left_by_the_fences() -> None:
    # limit 20: opening "```" + "\n" + body + "\n```" leaves 12 characters a piece
    text = f"{F}\n" + "z" * 30 + f"\n{F}"
    assert split(text, 20) == [f"{F}\n{'z' * 12}\n{F}", f"{F}\n{'z' * 12}\n{F}",
                               f"{F}\n{'z' * 6}\n{F}"]


@pytest.mark.parametrize(("markdown", "whatsapp"), [
    # markup-looking runs with nothing inside are text
    ("____", "____"),
    ("~~~~", "~~~~"),
    ("[a]()", "[a]()"),
    # each pair closes at its nearest partner
    ("__a__ and __b__", "*a* and *b*"),
    ("[a](b)[c](d)", "a (b)c (d)"),
    # an empty heading is an empty line, not a lone "**"
    ("# ", ""),
    ("a\n## ###\nb", "a\n\nb"),
    # a rule has one or more columns and nothing after it; a row of dashes is data
    ("| a |\n|---|\n| 1 |", "• a: 1"),
    ("| a | b |\n|---|---|\n|Bob|---|", "• a: Bob, b: ---"),
    ("| a | b |\n|---|---|\n|---| x |", "• a: ---, b: x"),
    # pipes inside a sentence are no table
    ("x | y | z", "x | y | z"),
    # a double-backtick span keeps what is inside verbatim
    ("``__a__``", "``__a__``"),
])
def test_more_to_whatsapp_rows(markdown: str, whatsapp: str) -> None:
    assert to_whatsapp(markdown) == whatsapp


def test_blank_lines_survive_a_cut_code_block() -> None:
    text = f"{F}\naaaa\n\nbbbb\n\ncccc\n{F}"
    assert split(text, 16) == [f"{F}\naaaa\n\n{F}", f"{F}\nbbbb\n\n{F}", f"{F}\ncccc\n{F}"]


def test_a_code_block_of_exactly_the_limit_is_not_cut() -> None:
    block = f"{F}abc\nxxxxxxxxx\n{F}"  # 20 characters, its tag longer than half the limit
    assert split(f"{block}\n\nyyyy", 20) == [block, "yyyy"]


def test_a_rule_with_text_after_it_is_a_row() -> None:
    assert to_whatsapp("| a | b |\n|---|---|\n|---|x|") == "• a: ---, b: x"


def test_table_cells_next_to_the_bars_keep_their_letters() -> None:
    assert to_whatsapp("|X|Y|\n|---|---|\n|1|X|") == "• X: 1, Y: X"


def test_tiny_limits_are_still_limits() -> None:
    assert split(f"{F}\nab\n{F}", 9) == [f"{F}\na\n{F}", f"{F}\nb\n{F}"]


def test_a_code_piece_is_filled_up_to_the_width_exactly() -> None:
    # limit 20 leaves 12 characters of body: "aaaaa\nbbbbbb" fills it exactly
    assert split(f"{F}\naaaaa\nbbbbbb\ncc\n{F}", 20) == [f"{F}\naaaaa\nbbbbbb\n{F}",
                                                         f"{F}\ncc\n{F}"]


def test_a_sentence_that_fits_is_kept_as_written() -> None:
    assert split("aa  bb. cc", 7) == ["aa  bb.", "cc"]


def test_a_text_of_exactly_the_limit_is_one_message_as_written() -> None:
    assert split("a\n\n\nbc", 6) == ["a\n\n\nbc"]  # not re-joined as "a\n\nbc"


@pytest.mark.parametrize("text", [
    "a\ue0000\ue001b **c**",  # what looks like a placeholder is the text's own
    "\ue000\ue001",
    "\ue000x\ue001 `y`",
    "\ue0001",
])
def test_private_use_characters_in_a_reply_come_back_as_they_were(text: str) -> None:
    assert to_whatsapp(text) == text.replace("**c**", "*c*")


def test_an_empty_code_block_with_a_huge_tag_is_not_lost() -> None:
    assert split(f"{F}{'x' * 30}\n{F}", 20) == [f"{F}\n\n{F}"]
