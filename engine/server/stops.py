"""OpenAI `stop` strings over a growing text, in O(new text + longest stop) per step.

Semantics (OpenAI / vLLM): the output ends just before the first stop string to appear in the text,
the stop string itself excluded, and the request finishes with finish_reason "stop". "First to
appear" reads the text left to right: the stop string completed earliest wins, so the answer does not
depend on how the text was split into tokens; among stop strings completed at the same character the
longest (the one starting earliest) wins. While the text grows, a tail that could still become a stop
string (a proper prefix of one) is held back until later text decides; the final text releases it.

One Knuth-Morris-Pratt automaton per stop string: its state is the length of the longest prefix of
the stop string that is a suffix of the text read so far. Each new character advances every automaton
(amortised O(1) each: a state rises by at most one per character, and each failure step lowers it),
and the held-back tail is the largest state. The failure table is extended lazily, one entry when a
state first reaches a new length, so the work is bounded by the text read, not by the stop strings'
length. Characters already read are never looked at again: a request costs O(output x number of
stops) whatever the stop strings are (the former whole-text search cost O(len(stop)²) per token: one
1 MB stop string froze the server for seconds).
"""

from __future__ import annotations

import contextlib
from typing import Iterator


class StopMatcher:
    """Feed the cumulative text (each call's text extends the previous one); `visible_end` says how
    much of it may be shown. After a match, `cut` is where the output ends, for good."""

    def __init__(self, stops: list[str]):
        if not all(stops):
            raise ValueError("stop strings must be non-empty")
        self.stops = list(stops)
        self.state = [0] * len(self.stops)
        # KMP failure tables, computed up to the longest state reached: fail[k][i] = length of
        # the longest proper border of stops[k][:i + 1]; border[k] = fail[k][-1] (the build cursor)
        self.fail: list[list[int]] = [[0] for _ in self.stops]
        self.border = [0] * len(self.stops)
        self.read = 0                   # text[:read] has gone through the automata
        self.cut: int | None = None     # output end once a stop string matched

    def _grow(self, k: int) -> None:
        """Append the next entry of fail[k] (the standard KMP table build, one step)."""
        s, fail, b = self.stops[k], self.fail[k], self.border[k]
        i = len(fail)
        while b and s[i] != s[b]:
            b = fail[b - 1]
        if s[i] == s[b]:
            b += 1
        fail.append(b)
        self.border[k] = b

    def visible_end(self, text: str, final: bool) -> int:
        """The length of the shown prefix of `text`: cut before a matched stop string; otherwise
        all of it when `final`, else all but a tail that may still grow into a stop string."""
        if self.cut is not None:
            return self.cut
        stops, fail, state = self.stops, self.fail, self.state
        for i in range(self.read, len(text)):
            ch, start = text[i], None
            for k, s in enumerate(stops):
                q = state[k]
                while q and s[q] != ch:
                    q = fail[k][q - 1]
                if s[q] == ch:
                    q += 1
                    if q > len(fail[k]):  # first time this far: fail[k][q - 1] is needed next
                        self._grow(k)
                if q == len(s):  # complete: starts at i + 1 - q; the earliest start wins ties
                    start = i + 1 - q if start is None else min(start, i + 1 - q)
                    q = fail[k][q - 1]
                state[k] = q
            if start is not None:
                self.read, self.cut = i + 1, start
                return start
        self.read = len(text)
        return len(text) if final else len(text) - max(state, default=0)


def apply_stops(snapshots: Iterator[dict], stops: list[str]) -> Iterator[dict]:
    """Engine snapshots (cumulative "output", "partial") with the output cut by `stops`; a match
    ends the stream with a final snapshot (partial False, finish_reason "stop") and closes
    `snapshots`, which stops the engine and frees the request's KV pages. Runs on the request's
    engine thread (streaming.engine_events), not on the event loop."""
    if not stops:
        yield from snapshots
        return
    matcher, shown = StopMatcher(stops), ""
    with contextlib.closing(snapshots):
        for snap in snapshots:
            text = snap["output"]
            end = matcher.visible_end(text, final=not snap["partial"])
            if end != len(shown):  # unchanged: the same object, so comparing it later is O(1)
                shown = text[:end]
            if matcher.cut is not None:
                yield {**snap, "output": shown, "partial": False, "finish_reason": "stop"}
                return
            yield {**snap, "output": shown}
