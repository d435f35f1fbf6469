"""The teacher as a long-lived vLLM server on loopback, and the client that has it score sequences.

On-policy training needs the teacher for the whole run: a `VllmServer` (distill.vllm.server) serves it
once on 127.0.0.1, every training process scores through `TeacherClient`, and the server is stopped when
training ends. The client asks /v1/completions for `prompt_logprobs=k` on token
ids (`max_tokens=1`): the same top-k plus actual-token logprobs the teacher stage's score mode stores.
A failed request is retried a bounded number of times, then training stops with a clear error.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

from distill.errors import DistillError
from distill.store import Capture
from distill.teacher import Item, _capture, fit_prompt

URL_ENV = "DISTILL_TEACHER_URL"


class TeacherUnavailable(DistillError):
    """The teacher server stopped answering (after the bounded retries)."""


SERVED_NAME = "teacher"


class TeacherClient:
    """Scores token sequences on a running teacher server: top-k at every position, like `VllmTeacher.score`."""

    def __init__(self, url: str, k: int, max_model_len: int, retries: int = 3, timeout: float = 300.0):
        self.url, self.k, self.max_model_len = url.rstrip("/"), k, max_model_len
        self.retries, self.timeout = retries, timeout

    def score(self, items: list[Item], start: list[int] | None = None) -> list[Capture]:
        """One capture per item; with `start`, only positions from start[i] on (the completion)."""
        fitted = [fit_prompt(ids, self.max_model_len - 1) for _, ids in items]
        body = {
            "model": SERVED_NAME,
            "prompt": [ids for ids, _ in fitted],
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": self.k,
        }
        choices = sorted(self._post("/v1/completions", body)["choices"], key=lambda c: c["index"])
        captures = []
        for i, ((item_id, _), (ids, cut), choice) in enumerate(zip(items, fitted, choices, strict=True)):
            positions = [_position(entry) for entry in choice["prompt_logprobs"]]
            s = 0 if start is None else max(0, start[i] - (len(items[i][1]) - len(ids)))
            # prompt_logprobs[t] is the distribution of token t given tokens < t: position p reads p + 1.
            captures.append(_capture(item_id, ids, s, positions, s + 1, self.k, cut))
        return captures

    def _post(self, path: str, body: dict) -> dict:
        data = json.dumps(body).encode()
        last: Exception | None = None
        for attempt in range(self.retries):
            request = urllib.request.Request(
                self.url + path, data=data, headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as exc:  # the server answered: a bad request is not retried
                detail = exc.read().decode(errors="replace")[:300]
                raise DistillError(
                    f"the teacher server refused a scoring request ({exc.code}): {detail}"
                ) from exc
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
                last = exc
                time.sleep(min(2.0**attempt, 10.0))
        raise TeacherUnavailable(
            f"the teacher server at {self.url} did not answer after {self.retries} tries ({last}); training stopped"
        )


def _position(entry: dict | None) -> dict[int, SimpleNamespace]:
    """One position of the JSON prompt_logprobs, in the dict form `teacher._entries` reads."""
    if not entry:
        return {}
    return {int(tid): SimpleNamespace(logprob=v["logprob"], rank=v.get("rank")) for tid, v in entry.items()}
