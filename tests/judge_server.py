"""A local OpenAI-compatible judge on 127.0.0.1 for tests (a real HTTP server)."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MARKER = "FRIENDLY"
_SHOWN = re.compile(r"Response 1:\n(.*)\n\nResponse 2:\n(.*)\n\nWhich", re.S)
_CRITERION = re.compile(r"^Criterion: (.*?)\n\nInstruction", re.S)


class JudgeServer:
    """A local OpenAI-compatible judge: prefers the response holding ``marker``.

    It records every request; ``script`` holds planned replies ``(status, body)`` for the next
    requests (``None``: answer normally). A response holding "UNSURE" gets a chatty reply.
    """

    def __init__(
        self, marker: str = MARKER, rule: Callable[[str, str, str], str] | None = None
    ) -> None:
        self.marker = marker
        self.rule = rule  # (criterion, first, second) -> reply; default: the marker rule
        self.requests: list[dict[str, Any]] = []
        self.refuse_max_tokens = False  # answer max_tokens as OpenAI's reasoning models do
        self.script: list[tuple[int, str] | None] = []
        self.lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.judge = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> JudgeServer:
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def answer(self, body: dict[str, Any]) -> str:
        content = body["messages"][-1]["content"]
        first, second = _SHOWN.search(content).groups()
        if self.rule is not None:
            return self.rule(_CRITERION.search(content)[1], first, second)
        if "UNSURE" in first + second:
            return "Both responses have merits."
        if (self.marker in first) == (self.marker in second):
            return "tie"
        return "1" if self.marker in first else "Response 2."

    def shown_first(self) -> list[str]:
        return [_SHOWN.search(r["body"]["messages"][-1]["content"])[1] for r in self.requests]


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        judge: JudgeServer = self.server.judge  # type: ignore[attr-defined]
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with judge.lock:
            judge.requests.append(
                {"path": self.path, "auth": self.headers.get("Authorization"), "body": body}
            )
            planned = judge.script.pop(0) if judge.script else None
        if planned is None and judge.refuse_max_tokens and "max_tokens" in body:
            planned = (400, json.dumps({"error": {
                "message": "Unsupported parameter: 'max_tokens' is not supported with this "
                "model. Use 'max_completion_tokens' instead.", "type": "invalid_request_error",
                "param": "max_tokens", "code": "unsupported_parameter"}}))  # fmt: skip
        if planned is None:
            reply = {"choices": [{"message": {"role": "assistant", "content": judge.answer(body)}}]}
            status, text = 200, json.dumps(reply)
        else:
            status, text = planned
        payload = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        if status == 429:
            self.send_header("Retry-After", "0")
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass
