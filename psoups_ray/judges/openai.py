"""A pairwise judge behind any OpenAI-compatible ``/chat/completions`` endpoint.

For each pair the judge shows the two responses in an order drawn from a seeded hash of the
pair (so half the pairs show ``b`` first, cancelling the judge's position bias), asks which
better satisfies the pole's criterion and maps the answer back. Failed requests are retried
with exponential backoff and jitter (connection errors, timeouts, 429, 5xx); any other 4xx
fails at once. Answers are cached in the run directory, keyed by what was asked, so a re-run
of an interrupted labelling pays only for what is missing. The API key is read from the
environment and never written anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from typing import Any

import httpx

from psoups_ray.config import OpenAIJudgeSpec
from psoups_ray.errors import PsoupsError
from psoups_ray.judges import PairToJudge, Verdict
from psoups_ray.preferences import PreferenceSpace
from psoups_ray.rundir import RunDir
from psoups_ray.seeding import derive_seed

SYSTEM_PROMPT = (
    "You compare two responses to the same instruction against one criterion. "
    'Answer with exactly one of: "1", "2" or "tie".'
)
USER_TEMPLATE = (
    "Criterion: {criterion}\n\n"
    "Instruction:\n{prompt}\n\n"
    "Response 1:\n{first}\n\n"
    "Response 2:\n{second}\n\n"
    'Which response better satisfies the criterion? Answer exactly "1", "2" or "tie".'
)
UNPARSEABLE = "unparseable"
ANSWER_TOKENS = 16  # "1", "2" or "tie", with room for a chattier answer
JUDGE_CACHE_PATH = "feedback/judge_cache.jsonl"  # the feedback stage's; evaluate has its own
_ANSWER = re.compile(r"^(?:response\s*)?(1|2)$|^(tie)$")
_EXCERPT_CHARS = 300


def judge_criteria(spec: OpenAIJudgeSpec, space: PreferenceSpace) -> dict[str, str]:
    """The criterion per pole: ``spec.criteria[pole]``, else the pole's preference prompt."""
    return {pole: spec.criteria.get(pole) or space.pole(pole).prompt for pole in space.pole_ids}


def openai_judge_problems(spec: OpenAIJudgeSpec, key: str, pole_ids: Sequence[str]) -> list[str]:
    """What is wrong with a judge's settings (``key`` names its config section)."""
    problems = [
        f"{key}.criteria: {pole!r} is not a pole of the preference space ({', '.join(pole_ids)})"
        for pole in spec.criteria
        if pole not in pole_ids
    ]
    if not spec.base_url.startswith(("http://", "https://")):
        problems.append(f"{key}.base_url: {spec.base_url!r} must start with http:// or https://")
    if not os.environ.get(spec.api_key_env, "").strip():
        problems.append(
            f"{key}.api_key_env: the environment variable {spec.api_key_env} is not set; export "
            "the judge's API key there (any non-empty value for a server that does not check "
            "keys)"
        )
    return problems


def parse_answer(text: str) -> str:
    """``"1"``, ``"2"`` or ``"tie"`` from a judge's reply, else :data:`UNPARSEABLE`."""
    normalized = text.strip().lower().strip(" \t\n.!\"'`*()[]:")
    match = _ANSWER.match(normalized)
    if match is None:
        return UNPARSEABLE
    return match.group(1) or match.group(2)


def cache_key(model: str, criterion: str, prompt: str, first: str, second: str) -> str:
    """sha256 of what the judge is asked (the order of the responses included)."""
    payload = json.dumps([model, criterion, prompt, first, second], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


class JudgeCache:
    """Judge answers by :func:`cache_key`, persisted as JSONL in the run directory.

    Written atomically (the whole file) every ``flush_every`` new answers and on
    :meth:`flush`; a new cache on the same run directory starts from what was written.
    Unparseable answers are cached too (requests are sent at temperature 0).
    """

    def __init__(
        self, rundir: RunDir, relpath: str = JUDGE_CACHE_PATH, flush_every: int = 50
    ) -> None:
        self.rundir = rundir
        self.relpath = relpath
        self.flush_every = flush_every
        self._answers: dict[str, str] = {}
        self._pending = 0
        self._lock = threading.Lock()
        if rundir.exists(relpath):
            for line in rundir.read_text(relpath).splitlines():
                try:
                    record = json.loads(line)
                    self._answers[record["key"]] = record["answer"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a damaged line costs one request, nothing more

    def __len__(self) -> int:
        return len(self._answers)

    def get(self, key: str) -> str | None:
        with self._lock:
            return self._answers.get(key)

    def put(self, key: str, answer: str) -> None:
        with self._lock:
            self._answers[key] = answer
            self._pending += 1
            due = self._pending >= self.flush_every
        if due:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            if not self._pending:
                return
            text = "".join(
                json.dumps({"key": key, "answer": answer}) + "\n"
                for key, answer in self._answers.items()
            )
            self.rundir.write_text(self.relpath, text)
            self._pending = 0


class OpenAIJudge:
    """Pairwise judge over HTTP; see the module docstring. Use as a context manager."""

    def __init__(
        self,
        spec: OpenAIJudgeSpec,
        criteria: Mapping[str, str],
        seed: int = 0,
        cache: JudgeCache | None = None,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
    ) -> None:
        api_key = os.environ.get(spec.api_key_env, "")
        if not api_key.strip():
            raise PsoupsError(
                f"the OpenAI-compatible judge needs an API key in the environment variable "
                f"{spec.api_key_env} (feedback.openai.api_key_env); set it (any non-empty "
                "value for a server that does not check keys). On a remote Ray cluster, pass "
                "it to the job's runtime environment"
            )
        self.spec = spec
        self.criteria = dict(criteria)
        self.seed = seed
        self.cache = cache
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.url = spec.base_url.rstrip("/") + "/chat/completions"
        self._api_key = api_key
        self._client = httpx.Client(
            timeout=spec.timeout_s, headers={"Authorization": f"Bearer {api_key}"}
        )
        self._lock = threading.Lock()
        self._length_field = "max_tokens"  # or max_completion_tokens, once asked for it
        self._jitter = random.Random(seed)
        self.stats = {
            "judged": 0,
            "requests": 0,
            "cache_hits": 0,
            "retries": 0,
            "unparseable": 0,
            "shown_b_first": 0,
        }

    # -- the PairwiseJudge interface ------------------------------------------------------------
    def compare(self, pole: str, prompt: str, a: str, b: str) -> Verdict:
        return self.compare_batch(pole, [PairToJudge(prompt, a, b)])[0]

    def compare_batch(self, pole: str, pairs: Sequence[PairToJudge]) -> list[Verdict]:
        """Judge ``pairs`` with up to ``concurrency`` requests in flight; flushes the cache."""
        criterion = self._criterion(pole)
        failed = threading.Event()  # after a failure, send nothing more

        def judge_one(pair: PairToJudge) -> Verdict:
            if failed.is_set():
                raise CancelledError
            try:
                return self._judge_one(pole, criterion, pair)
            except BaseException:
                failed.set()
                raise

        pool = ThreadPoolExecutor(max_workers=self.spec.concurrency)
        futures: list[Future[Verdict]] = [pool.submit(judge_one, pair) for pair in pairs]
        try:
            return [future.result() for future in futures]
        finally:
            failed.set()
            pool.shutdown(wait=True, cancel_futures=True)
            if self.cache is not None:
                self.cache.flush()

    def describe(self) -> dict[str, Any]:
        with self._lock:
            stats = dict(self.stats)
        return {
            "type": "openai",
            "model": self.spec.model,
            "base_url": self.spec.base_url,
            "api_key_env": self.spec.api_key_env,
            **stats,
        }

    # -- lifecycle ------------------------------------------------------------------------------
    def close(self) -> None:
        if self.cache is not None:
            self.cache.flush()
        self._client.close()

    def __enter__(self) -> OpenAIJudge:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- one pair -------------------------------------------------------------------------------
    def _criterion(self, pole: str) -> str:
        try:
            return self.criteria[pole]
        except KeyError:
            raise PsoupsError(
                f"no judge criterion for pole {pole!r} (known: {', '.join(self.criteria)})"
            ) from None

    def shows_b_first(self, pole: str, pair: PairToJudge) -> bool:
        """The seeded position of a pair: a hash, so it does not depend on judging order."""
        return derive_seed(self.seed, "position", pole, pair.prompt, pair.a, pair.b) % 2 == 1

    def _judge_one(self, pole: str, criterion: str, pair: PairToJudge) -> Verdict:
        swapped = self.shows_b_first(pole, pair)
        first, second = (pair.b, pair.a) if swapped else (pair.a, pair.b)
        key = cache_key(self.spec.model, criterion, pair.prompt, first, second)
        answer = self.cache.get(key) if self.cache is not None else None
        if answer is None:
            content = self._request(_messages(criterion, pair.prompt, first, second))
            answer = parse_answer(content)
            if self.cache is not None:
                self.cache.put(key, answer)
        else:
            self._count("cache_hits")
        self._count("judged")
        if swapped:
            self._count("shown_b_first")
        if answer == UNPARSEABLE:
            self._count("unparseable")
            return "tie"
        if answer == "tie":
            return "tie"
        first_wins = answer == "1"
        return "b" if first_wins == swapped else "a"

    def _count(self, name: str) -> None:
        with self._lock:
            self.stats[name] += 1

    def _request(self, messages: list[dict[str, str]]) -> str:
        """The reply's text; retries transient failures, fails fast on other 4xx.

        The answer's length is capped with ``max_tokens``; an endpoint that refuses it for
        ``max_completion_tokens`` (OpenAI's reasoning models) is asked again with that,
        and every later request sends what it accepted."""
        payload = {
            "model": self.spec.model,
            "messages": messages,
            "temperature": 0,
            self._length_field: ANSWER_TOKENS,
        }
        problem = ""
        for attempt in range(self.spec.max_retries + 1):
            if attempt:
                self._count("retries")
            self._count("requests")
            retry_after = 0.0
            try:
                response = self._client.post(self.url, json=payload)
                if response.status_code == 400 and _wants_completion_tokens(response, payload):
                    with self._lock:
                        self._length_field = "max_completion_tokens"
                    payload["max_completion_tokens"] = payload.pop("max_tokens")
                    self._count("requests")
                    response = self._client.post(self.url, json=payload)
            except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
                raise PsoupsError(
                    f"feedback.openai.base_url {self.spec.base_url!r} is not a usable URL "
                    f"({exc}); write it like http://host:port/v1"
                ) from None
            except httpx.TransportError as exc:  # connection errors, timeouts, broken replies
                problem = f"{type(exc).__name__}: {self._redact(str(exc))}"
            else:
                if response.is_success:
                    return _reply_text(response)
                status = response.status_code
                excerpt = self._redact(response.text[:_EXCERPT_CHARS].strip())
                if status != 429 and status < 500:
                    raise PsoupsError(
                        f"judge request to {self.url} was refused with HTTP {status}: {excerpt!r}."
                        f" Check feedback.openai.model ({self.spec.model!r}), base_url and the "
                        f"key in ${self.spec.api_key_env}"
                    )
                problem = f"HTTP {status}: {excerpt!r}"
                retry_after = _retry_after_seconds(response)
            if attempt < self.spec.max_retries:
                time.sleep(self._backoff(attempt, retry_after))
        raise PsoupsError(
            f"judge request to {self.url} failed after {self.spec.max_retries + 1} attempt(s) "
            f"(feedback.openai.max_retries={self.spec.max_retries}); last error: {problem}"
        )

    def _backoff(self, attempt: int, retry_after: float) -> float:
        """Exponential backoff with jitter, at least the server's Retry-After (capped)."""
        with self._lock:
            jitter = self._jitter.uniform(0, self.backoff_s)
        delay = min(self.max_backoff_s, self.backoff_s * 2**attempt) + jitter
        return max(delay, min(retry_after, self.max_backoff_s))

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text


def _wants_completion_tokens(response: httpx.Response, payload: dict) -> bool:
    """Whether a 400 says to send ``max_completion_tokens`` instead of ``max_tokens``."""
    return "max_tokens" in payload and "max_completion_tokens" in response.text


def _messages(criterion: str, prompt: str, first: str, second: str) -> list[dict[str, str]]:
    user = USER_TEMPLATE.format(criterion=criterion, prompt=prompt, first=first, second=second)
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def _reply_text(response: httpx.Response) -> str:
    """The first choice's message text; empty (hence unparseable) for a malformed reply."""
    try:
        content = response.json()["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return ""
    return content if isinstance(content, str) else ""


def _retry_after_seconds(response: httpx.Response) -> float:
    try:
        return max(0.0, float(response.headers.get("retry-after", "0")))
    except ValueError:
        return 0.0
