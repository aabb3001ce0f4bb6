"""A generation's streamed text: split UTF-8 held, stop strings across tokens never streamed."""

from __future__ import annotations

import codecs

from hypothesis import given
from hypothesis import strategies as st

from consumer.engine.llamacpp.text import TextStream


def stream(pieces: list[bytes], stop: tuple[str, ...] = ()) -> tuple[list[str], TextStream]:
    """Feed pieces until a stop string ends the generation, else to the end (like the backend)."""
    text = TextStream(stop)
    deltas = []
    for piece in pieces:
        deltas.append(text.feed(piece))
        if text.stopped:
            return deltas, text
    deltas.append(text.finish())
    return deltas, text


def test_without_stop_strings_each_token_streams_at_once() -> None:
    deltas, text = stream([b"Hello", b",", b" world"])
    assert deltas == ["Hello", ",", " world", ""]
    assert text.text == "Hello, world"


def test_a_character_split_between_tokens_waits_for_its_last_byte() -> None:
    deltas, text = stream([b"caf\xc3", b"\xa9 ", b"\xe2\x82", b"\xac"])  # "café €"
    assert deltas == ["caf", "é ", "", "€", ""]
    assert text.text == "café €"


def test_an_incomplete_character_at_the_end_is_dropped() -> None:
    deltas, text = stream([b"ok", b"\xe2\x82"])
    assert "".join(deltas) == text.text == "ok"


def test_a_stop_string_across_tokens_is_never_streamed() -> None:
    deltas, text = stream([b"Hel", b"lo ", b"wor", b"ld"], stop=("o w",))
    assert deltas == ["Hel", "l", ""]
    assert text.stopped
    assert text.text == "Hell"


def test_text_after_a_stop_string_in_the_same_token_is_dropped() -> None:
    deltas, text = stream([b"yes", b" STOP and more"], stop=("STOP",))
    assert deltas == ["yes", " "]
    assert text.text == "yes "
    assert text.feed(b"later") == ""


def test_the_earliest_stop_string_wins() -> None:
    _, text = stream([b"a;b.c;"], stop=(";", "."))
    assert text.text == "a"
    _, text = stream([b"ab", b"c", b"d"], stop=("cd", "bc"))
    assert text.text == "a"


def test_a_stop_string_at_the_start_gives_empty_text() -> None:
    deltas, text = stream([b"\n\n", b"rest"], stop=("\n\n",))
    assert deltas == [""]
    assert text.text == ""


def test_text_that_only_looked_like_a_stop_string_is_released() -> None:
    deltas, text = stream([b"a#", b"#b", b"#"], stop=("###",))
    # "#" then "##" may start "###"; "##b" cannot; the final "#" is released at the end.
    assert deltas == ["a", "##b", "", "#"]
    assert text.text == "a##b#"


def test_empty_stop_strings_are_ignored() -> None:
    deltas, text = stream([b"abc"], stop=("",))
    assert deltas == ["abc", ""]
    assert text.text == "abc"


@given(
    st.lists(st.text(alphabet="ab#é€\n", max_size=6), max_size=12),
    st.lists(st.text(alphabet="ab#é\n", min_size=1, max_size=3), max_size=3),
    st.integers(min_value=1, max_value=4),
)
def test_streamed_text_is_the_reply_cut_at_the_earliest_stop(
    words: list[str], stops: list[str], split: int
) -> None:
    full = "".join(words)
    data = full.encode("utf-8")
    # Token boundaries anywhere, mid-character included.
    pieces = [data[i : i + split] for i in range(0, len(data), split)]
    deltas, text = stream(pieces, tuple(stops))
    # Generation stops at the first token after which a stop string is complete (so with
    # overlapping stops, token boundaries decide which one); the reply ends where the
    # earliest stop string found then starts.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")
    seen, expected = "", None
    for piece in pieces:
        seen += decoder.decode(piece)
        found = [seen.find(s) for s in stops if s in seen]
        if found:
            expected = seen[: min(found)]
            break
    if expected is None:
        expected = seen + decoder.decode(b"", final=True)
    assert text.text == expected
    assert "".join(deltas) == expected
    streamed = ""
    for delta in deltas:
        streamed += delta
        assert not any(s in streamed for s in stops)
