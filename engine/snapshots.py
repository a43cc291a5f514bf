"""Engine events of one request → the cumulative snapshots the API streams.

Events (see fastllava.runtime.engine): ("token", id) per sampled token, then ("finish", reason)
or ("error", exception). Snapshots: {"output": text so far, "partial": True, "prompt_tokens",
"completion_tokens" (stop id included), "finish_reason": None}; the last one has partial False,
the finish reason ("stop" for a stop id, "length" for max_tokens or the context limit) and the
request's "metrics" (queue_s, ttft_s, e2e_s, decode_tokens_per_s, token counts).
A request that asked for logprobs (SamplingParams.logprobs) also gets "logprobs", cumulative like
"output": one entry per generated token so far (the stop id's excluded), each
{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}, ...]} (OpenAI's
chat shape). A snapshot may be skipped by a consumer without losing entries.
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
        self.tokenizer = tokenizer
        self.entries: list[dict] = []   # logprob entries so far (a new list when it grows)

    def _token(self, token_id: int) -> dict:
        text = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return {"token": text, "bytes": list(text.encode("utf-8"))}

    def _logprobs(self, handle, upto: int) -> dict:
        """{"logprobs": the entries of the first `upto` tokens} when the request asked, else {}.
        Earlier snapshots keep their own (shorter) list: it is copied when it grows."""
        if handle is None or handle.seq.params.logprobs is None:
            return {}
        seq, new = handle.seq, []
        for i in range(len(self.entries), upto):
            logprob, top = seq.logprobs[i]
            new.append({**self._token(seq.token_ids[seq.prompt_len + i]), "logprob": logprob,
                        "top_logprobs": [{**self._token(t), "logprob": v} for t, v in top]})
        if new:
            self.entries = self.entries + new
        return {"logprobs": self.entries}

    def on_event(self, kind: str, value, handle) -> dict | None:
        """The snapshot to yield for this event (None: nothing new); raises a failed request's
        error."""
        if kind == "error":
            raise value
        if kind == "finish":
            n = self.counts["completion_tokens"]
            if n and handle.seq.token_ids[-1] in self.stop_ids:
                n -= 1
            return {"output": self.detok.text(), "partial": False, **self.counts,
                    "finish_reason": value, "metrics": handle.metrics,
                    **self._logprobs(handle, n)}
        self.counts["completion_tokens"] += 1
        if value in self.stop_ids:     # the stop id ends the text; "finish" follows
            return None
        new = self.detok.push(value)
        if new == self.text and not self.every_token:
            return None
        self.text = new
        return {"output": new, "partial": True, **self.counts, "finish_reason": None,
                **self._logprobs(handle, self.counts["completion_tokens"])}
