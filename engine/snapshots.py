"""Engine events of one request → the cumulative snapshots the API streams.

Events (see fastllava.runtime.engine): ("token", id) per sampled token, then ("finish", reason)
or ("error", exception). Snapshots: {"output": text so far, "partial": True, "prompt_tokens",
"completion_tokens" (stop id included), "finish_reason": None}; the last one has partial False,
the finish reason ("stop" for a stop id, "length" for max_tokens or the context limit) and the
request's "metrics" (queue_s, ttft_s, e2e_s, decode_tokens_per_s, token counts).
"""

from __future__ import annotations

from fastllava.text.detokenize import IncrementalDetokenizer


class Snapshots:
    def __init__(self, tokenizer, stop_ids: tuple[int, ...], prompt_tokens: int,
                 every_token: bool):
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stop_ids = stop_ids
        self.counts = {"prompt_tokens": prompt_tokens, "completion_tokens": 0}
        self.every_token = every_token
        self.text = ""

    def on_event(self, kind: str, value, handle) -> dict | None:
        """The snapshot to yield for this event (None: nothing new); raises a failed request's
        error."""
        if kind == "error":
            raise value
        if kind == "finish":
            return {"output": self.detok.text(), "partial": False, **self.counts,
                    "finish_reason": value, "metrics": handle.metrics}
        self.counts["completion_tokens"] += 1
        if value in self.stop_ids:     # the stop id ends the text; "finish" follows
            return None
        new = self.detok.push(value)
        if new == self.text and not self.every_token:
            return None
        self.text = new
        return {"output": new, "partial": True, **self.counts, "finish_reason": None}
