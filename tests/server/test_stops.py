"""OpenAI stop strings (fastllava.server.stops), in process: the incremental matcher against a
brute-force reference over many random texts, stop sets and token splits; apply_stops on an
engine-like snapshot stream; the per-token cost does not grow with the stop length."""

from __future__ import annotations

import random
import time

import pytest

from fastllava.server.stops import StopMatcher, apply_stops


def reference(text: str, stops: list[str]) -> tuple[str, bool]:
    """The output for the whole text: cut before the stop string completed first (longest among
    those completed at the same character); (output, matched)."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text.startswith(s, end - len(s)) and end >= len(s)]
        if done:
            return text[:end - max(map(len, done))], True
    return text, False


def held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of a stop string."""
    return max((k for s in stops for k in range(1, min(len(s) - 1, len(text)) + 1)
                if text.endswith(s[:k])), default=0)


def feed(stops: list[str], pieces: list[str]) -> tuple[list[str], StopMatcher]:
    """Visible text after each cumulative piece (the last one final)."""
    m, text, shown = StopMatcher(stops), "", []
    for i, piece in enumerate(pieces):
        text += piece
        shown.append(text[:m.visible_end(text, final=i == len(pieces) - 1)])
    return shown, m


def test_holds_back_possible_prefixes_and_releases_them():
    shown, m = feed(["END", "xy"], ["abcE", "N", "x", "z"])
    assert shown == ["abc", "abc", "abcEN", "abcENxz"]       # "E", "EN", "x" waited
    assert m.cut is None
    shown, m = feed(["END", "xy"], ["abcE", "N", "x", "zxy and more"])
    assert shown[-1] == "abcENxz" and m.cut == 7
    assert feed(["END"], ["abcE"])[0] == ["abcE"]             # final: nothing held back


def test_stop_split_across_tokens():
    whole, _ = feed(["<|end|>"], ["hello <|end|> tail"])
    for split in (["hello <", "|e", "nd", "|> tail"], ["hello <|en", "d|>", " tail"],
                  list("hello <|end|> tail")):
        shown, m = feed(["<|end|>"], split)
        assert shown[-1] == whole[-1] == "hello " and m.cut == 6, split
        assert all("<" not in s for s in shown), shown  # a stop's start is never shown


def test_earliest_and_overlapping_stops():
    assert feed(["world", "lo w"], ["hello world"])[0][-1] == "hel"      # earliest wins
    assert feed(["lo w", "world"], ["hello world"])[0][-1] == "hel"      # order irrelevant
    assert feed(["abcd", "bc"], ["xab", "cd"])[0][-1] == "xa"            # completed first
    assert feed(["bc", "abc"], ["xabc"])[0][-1] == "x"                  # same end: longest
    assert feed(["aab"], ["a", "a", "a", "b"])[0] == ["", "", "a", "a"]  # self-overlap (KMP)
    assert feed(["abab"], ["ababab"])[0][-1] == ""
    assert feed(["ab", "b"], ["xxb"])[0][-1] == "xx"


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_for_any_split(seed):
    rng = random.Random(seed)
    for _ in range(400):
        alphabet = "ab" if rng.random() < 0.5 else "abc "
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 5)))
                 for _ in range(rng.randint(1, 4))]
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 8)))) \
            if len(text) > 1 else []
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
        shown, m = feed(stops, pieces)
        assert (m.cut is not None) == reference(text, stops)[1], (text, stops)
        so_far = ""
        for i, (piece, visible) in enumerate(zip(pieces, shown)):
            so_far += piece
            want, matched = reference(so_far, stops)
            if matched or i == len(pieces) - 1:
                assert visible == want, (so_far, stops, pieces, visible)
            else:  # exactly the tail that may still become a stop string is held back
                assert visible == so_far[:len(so_far) - held_back(so_far, stops)], (
                    so_far, stops, visible)


class _Source:
    """An engine-like snapshot stream: one char per token, then a final snapshot."""

    def __init__(self, text: str):
        self.text, self.closed, self.produced = text, False, 0

    def __iter__(self):
        for i in range(1, len(self.text) + 1):
            self.produced = i
            yield {"output": self.text[:i], "partial": True, "completion_tokens": i,
                   "finish_reason": None}
        yield {"output": self.text, "partial": False, "completion_tokens": len(self.text),
               "finish_reason": "length"}

    def close(self):
        self.closed = True


def test_apply_stops_ends_the_stream_and_closes_the_engine():
    source = _Source("one two STOP three four five")
    it = iter(source)
    wrapped = apply_stops(it, ["STOP", "xyz"])
    snaps = list(wrapped)
    assert snaps[-1] == {"output": "one two ", "partial": False, "completion_tokens": 12,
                         "finish_reason": "stop"}
    assert all(s["partial"] for s in snaps[:-1]) and all(
        "STOP"[:1] not in s["output"] for s in snaps)
    assert source.produced == 12, "the engine ran past the stop string"
    assert it.gi_frame is None, "the engine stream was not closed"


def test_apply_stops_passes_through_without_a_match():
    snaps = list(apply_stops(iter(_Source("abc S")), ["STOP"]))
    assert [s["output"] for s in snaps] == ["a", "ab", "abc", "abc ", "abc ", "abc S"]
    assert snaps[-1]["finish_reason"] == "length" and not snaps[-1]["partial"]


def test_cost_does_not_grow_with_stop_length():
    """4 stops of 3,000,000 chars whose prefixes keep matching the text (the worst case for holding
    back): the work follows the text read. The former whole-text matcher needed O(len(stop)^2) per
    token here, and even building the KMP tables up front would take seconds."""
    text = "a" * 3000
    stops = ["a" * 2_999_999 + c for c in "bcde"]
    t0 = time.perf_counter()
    m = StopMatcher(stops)
    for end in range(1, len(text) + 1, 3):      # ~3 characters per token
        assert m.visible_end(text[:end], final=False) == 0
    assert m.visible_end(text, final=True) == len(text)
    assert time.perf_counter() - t0 < 1.0, "stop matching is not incremental"
