"""Ray Serve for real: the OpenAI-compatible app over the smoke run's pole policies,
driven over HTTP on 127.0.0.1 with the official openai client and raw requests."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai
import pytest
from clusters import (
    SERVE_CLI,
    first_chat_answer,
    free_port,
    shipped_serve_config,
    stop_processes_naming,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from psoups_ray.artifacts import RunArtifacts
from psoups_ray.rundir import RunDir

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
TOKEN_ENV = "PSOUPS_TEST_API_KEY"
TOKEN = "test-secret"
HEADERS = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
TUNED = {"P2A": 0.8, "P3B": 0.2}
REQUEST_LIMIT = 64 * 1024  # the served app's max_request_bytes


@pytest.fixture(scope="module")
def served(policy_run, tmp_path_factory):
    """The app on the session's Ray cluster, for a copy of the policy run with tuned
    weights for one combination; stopped after the module."""
    from ray import serve

    from psoups_ray.manifest import Manifest
    from psoups_ray.serve.app import bind_app

    source, _ = policy_run
    out = tmp_path_factory.mktemp("serve") / "run"
    shutil.copytree(source, out)
    manifest = Manifest.load(RunDir(out))
    manifest.data["tuned_weights"] = {"P2A+P3B": TUNED}
    manifest.save()
    port = free_port()
    os.environ[TOKEN_ENV] = TOKEN
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = bind_app(
        {"run": str(out), "max_tokens": 48, "default_max_tokens": 16, "max_prompt_tokens": 64,
         "max_n": 3, "max_request_bytes": REQUEST_LIMIT, "auth_token_env": TOKEN_ENV},
        {"SoupModel": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}},
         "Ingress": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1}}},
    )  # fmt: skip
    serve.run(app, name="psoups", route_prefix="/")
    base_url = f"http://127.0.0.1:{port}"
    yield out, base_url
    serve.delete("psoups")
    serve.shutdown()


def _client(base_url: str, key: str = TOKEN) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0, timeout=120)


def _engine_text(out: Path, soup: str, question: str, max_tokens: int) -> str:
    """The same greedy generation in-process, without Serve."""
    import torch

    from psoups_ray.prompting import format_prompt
    from psoups_ray.serve.engine import GenerationJob, SamplingParams, SoupEngine

    threads = torch.get_num_threads()
    try:
        engine = SoupEngine(str(out), device="cpu")
        weights = engine.catalog.resolve(soup).weights
        prompt = format_prompt(engine.tokenizer, question)
        job = GenerationJob(prompt, weights, SamplingParams(max_tokens, temperature=0.0))
        return engine.generate([job])[0]["text"]
    finally:
        torch.set_num_threads(threads)


QUESTION = "What is salt?"


def test_chat_completion_for_a_combination_equals_the_engine(served):
    out, base_url = served
    client = _client(base_url)
    response = client.chat.completions.create(
        model="psoups:P3B+P2A",  # any order; canonicalised
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=24,
        temperature=0,
    )
    assert response.model == "psoups:P2A+P3B"
    choice = response.choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.message.role == "assistant"
    assert 0 < response.usage.completion_tokens <= 24 and response.usage.prompt_tokens > 0
    extra = response.model_extra["psoups"]
    assert extra == {"weights": TUNED, "source": "tuned"}
    assert choice.message.content == _engine_text(out, "psoups:P2A+P3B", QUESTION, 24)
    # A combination without tuned weights is served as the uniform soup.
    uniform = client.chat.completions.create(
        model="psoups:P2B+P3A", messages=[{"role": "user", "content": QUESTION}], max_tokens=4
    )
    assert uniform.model_extra["psoups"] == {
        "weights": {"P2B": 0.5, "P3A": 0.5},
        "source": "uniform",
    }


def test_streaming_returns_the_same_text_as_one_response(served):
    _, base_url = served
    client = _client(base_url)
    request = dict(
        model="psoups:P2A",
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=32,
        temperature=0.8,
        seed=7,
    )
    whole = client.chat.completions.create(**request).choices[0].message.content
    usage = {"include_usage": True}
    chunks = list(client.chat.completions.create(**request, stream=True, stream_options=usage))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length") and all(f is None for f in finishes[:-1])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_several_choices_completions_and_the_extension_fields(served):
    _, base_url = served
    client = _client(base_url)
    response = client.chat.completions.create(
        model="psoups:P2B+P3B",
        messages=[{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": QUESTION}],
        max_tokens=12, n=3, seed=1,
    )  # fmt: skip
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert all(c.finish_reason in ("stop", "length") for c in response.choices)
    assert 3 <= response.usage.completion_tokens <= 36
    completion = client.completions.create(
        model="psoups:base", prompt="### Instruction:\nWhat is salt?\n\n### Response:\n",
        max_tokens=8, temperature=0,
    )  # fmt: skip
    assert completion.choices[0].text and completion.model == "psoups:base"
    # weights={P2A: 1} is the P2A policy itself; preferences=[...] names a combination.
    by_weights = client.chat.completions.create(
        model="ignored", messages=[{"role": "user", "content": QUESTION}], max_tokens=16,
        temperature=0, extra_body={"weights": {"P2A": 1.0}},
    )  # fmt: skip
    by_model = client.chat.completions.create(
        model="psoups:P2A", messages=[{"role": "user", "content": QUESTION}], max_tokens=16,
        temperature=0,
    )  # fmt: skip
    assert by_weights.choices[0].message.content == by_model.choices[0].message.content
    by_preferences = client.chat.completions.create(
        model="ignored", messages=[{"role": "user", "content": QUESTION}], max_tokens=4,
        extra_body={"preferences": ["P3B", "P2A"]},
    )  # fmt: skip
    assert by_preferences.model == "psoups:P2A+P3B"


def test_models_health_and_auth(served):
    _, base_url = served
    ids = [model.id for model in _client(base_url).models.list()]
    assert ids[0] == "psoups:base"
    assert {"psoups:P2A", "psoups:P2B", "psoups:P3A", "psoups:P3B", "psoups:P2A+P3B"} <= set(ids)
    health = httpx.get(f"{base_url}/healthz", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    with pytest.raises(openai.AuthenticationError):
        _client(base_url, key="wrong").models.list()
    anonymous = httpx.post(
        f"{base_url}/v1/chat/completions",
        json={"model": "psoups:P2A", "messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
    )
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["type"] == "authentication_error"


BAD_REQUESTS = [
    ({"model": "psoups:P9Z"}, "model", "P9Z"),
    ({"model": "psoups:P2A+P2B"}, "model", "dimension"),
    ({"model": "gpt-4"}, "model", "psoups:"),
    ({"weights": {"P2A": -1.0}}, "weights", ">= 0"),
    ({"weights": {"P2A": 0.0}}, "weights", "zero"),
    ({"weights": {"P2A": 1.0, "P2B": 1.0}}, "weights", "dimension"),
    ({"preferences": "P2A"}, "preferences", "list"),
    ({"max_tokens": "many"}, "max_tokens", "integer"),
    ({"max_tokens": 500}, "max_tokens", "<= 48"),
    ({"n": 9}, "n", "<= 3"),
    ({"temperature": -1}, "temperature", "temperature"),
    ({"messages": []}, "messages", "messages"),
    ({"messages": [{"role": "user", "content": "   "}]}, "messages", "user message"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role", "role"),
    ({"messages": [{"role": "user", "content": "salt " * 200}]}, "messages", "tokens"),
    ({"adapter_path": "/tmp/evil"}, "adapter_path", "unknown"),
    ({"logit_bias": {"1": 5}}, "logit_bias", "unknown"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        "messages.0.content",
        "only text parts",
    ),
    ({"response_format": {"type": "json_object"}}, "response_format.type", "only 'text'"),
    ({"top_logprobs": 2}, "top_logprobs", "logprobs: true"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "20"),
    ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({"min_tokens": 9}, "min_tokens", "exceeds max_tokens"),
    ({"frequency_penalty": 3}, "frequency_penalty", "2"),
    ({"repetition_penalty": 0}, "repetition_penalty", "greater than 0"),
    ({"min_p": 1.5}, "min_p", "1"),
]


@pytest.mark.parametrize(("change", "param", "words"), BAD_REQUESTS)
def test_bad_requests_get_a_400_naming_the_field(served, change, param, words):
    _, base_url = served
    body = {"model": "psoups:P2A", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    body.update(change)
    response = httpx.post(
        f"{base_url}/v1/chat/completions", json=body, timeout=60,
        headers={"Authorization": f"Bearer {TOKEN}"},
    )  # fmt: skip
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert error["type"] == "invalid_request_error"


def test_malformed_bodies_and_the_next_request_still_works(served):
    _, base_url = served
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    for raw, words in [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"model": "psoups:P2A", "messages": [{"role": "user", "content": "hi"}], '
         b'"weights": {"P2A": NaN}}', "finite"),
    ]:  # fmt: skip
        response = httpx.post(f"{base_url}/v1/chat/completions", content=raw, headers=headers)
        assert response.status_code == 400 and words in response.json()["error"]["message"]
    good = _client(base_url).chat.completions.create(
        model="psoups:P3A", messages=[{"role": "user", "content": QUESTION}], max_tokens=4
    )
    assert good.choices[0].message.content is not None


def _replica_pid(app: str = "psoups") -> int:
    from ray import serve

    return serve.get_deployment_handle("SoupModel", app_name=app).info.remote().result()["pid"]


def _chat(base_url: str, change: dict, chat: bool = True) -> httpx.Response:
    """A small valid chat (or completion) request with ``change`` applied."""
    body: dict = {"model": "psoups:P2A", "max_tokens": 4}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"})
    body.update(change)
    path = "/v1/chat/completions" if chat else "/v1/completions"
    return httpx.post(f"{base_url}{path}", json=body, headers=HEADERS, timeout=60)


EXTREME_VALUES = [  # (change, the 400's param; None: served)
    ({"max_tokens": 10**30}, "max_tokens"),
    ({"max_tokens": -(2**70)}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"max_tokens": "many"}, "max_tokens"),
    ({"max_tokens": [4]}, "max_tokens"),
    ({"max_tokens": None}, None),  # the default
    ({"max_completion_tokens": 2**64}, "max_tokens"),
    ({"n": 10**30}, "n"),
    ({"n": -1}, "n"),
    ({"n": 1.5}, "n"),
    ({"n": "3x"}, "n"),
    ({"n": None}, "n"),
    ({"seed": 2**64}, "seed"),
    ({"seed": 2**63 - 1, "n": 3}, None),  # seed + choice index stays in torch's range
    ({"seed": -(2**63)}, None),
    ({"temperature": 1e308}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"weights": {"P2A": 10.0, "P3B": 0.5}}, None),  # MAX_SOUP_WEIGHT
    ({"weights": {"P2A": 10.5}}, "weights"),
    ({"weights": {"P2A": 1e308}}, "weights"),
    ({"weights": {"P2A": 10**400}}, "weights.P2A"),  # no float holds it
]


@pytest.mark.parametrize(("change", "param"), EXTREME_VALUES)
@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completion"])
def test_extreme_numbers_get_a_400_naming_the_field_never_a_500(served, change, param, chat):
    _, base_url = served
    response = _chat(base_url, change, chat)
    if param is None:
        assert response.status_code == 200 and response.json()["choices"], response.text
    else:
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param, response.text


def test_a_row_whose_logits_overflow_does_not_fail_its_batch(served):
    """Weights past MAX_SOUP_WEIGHT are refused at the edge; should a soup still overflow (say in
    float16), its row decodes greedily and the other rows of the batch are untouched."""
    import torch

    from psoups_ray.prompting import format_prompt
    from psoups_ray.serve.engine import GenerationJob, SamplingParams, SoupEngine

    out, _ = served
    threads = torch.get_num_threads()
    try:
        engine = SoupEngine(str(out), device="cpu")
        prompt = format_prompt(engine.tokenizer, QUESTION)
        overflowing = (1e30,) + (0.0,) * (len(engine.catalog.adapter_names) - 1)
        pole = engine.catalog.resolve("psoups:P3A").weights
        jobs = [
            GenerationJob(prompt, overflowing, SamplingParams(8, temperature=1.0, seed=1)),
            GenerationJob(prompt, pole, SamplingParams(8, temperature=0.0)),
            GenerationJob(prompt, pole, SamplingParams(8, temperature=1.0, seed=3)),
        ]
        together = engine.generate(jobs)
        assert together[1:] == engine.generate(jobs[1:])
    finally:
        torch.set_num_threads(threads)


def test_finished_requests_leave_the_decoding_batch_and_the_others_decode_the_same(served):
    """Rows that end (their own max_tokens, EOS) stop being computed; every row's text is
    what it gets decoded alone (each row samples from its own generator)."""
    import torch

    from psoups_ray.prompting import format_prompt
    from psoups_ray.runtime.decoder import decoder_for
    from psoups_ray.serve.engine import GenerationJob, SamplingParams, SoupEngine

    out, _ = served
    threads = torch.get_num_threads()
    try:
        engine = SoupEngine(str(out), device="cpu")
        prompt = format_prompt(engine.tokenizer, QUESTION)
        soups = ["psoups:P2A+P3B", "psoups:P3B", "psoups:base", "psoups:P2B+P3A", "psoups:P3A"]
        jobs = [
            GenerationJob(
                prompt,
                engine.catalog.resolve(soup).weights,
                SamplingParams(max_tokens, temperature=temperature, seed=seed),
            )
            for soup, max_tokens, temperature, seed in zip(
                soups, [2, 3, 40, 6, 40], [1.0, 0.0, 1.0, 0.7, 1.0], [1, None, 2, 3, 4], strict=True
            )
        ]
        batch_sizes: list[int] = []  # the rows of each forward pass the decoder runs
        decoder = decoder_for(engine.model)
        forward = decoder._forward

        def counted(ids, *args, **kwargs):
            batch_sizes.append(ids.shape[0])
            return forward(ids, *args, **kwargs)

        decoder._forward = counted
        try:
            together = engine.generate(jobs)
        finally:
            del decoder._forward
        alone = [engine.generate([job])[0] for job in jobs]
        assert together == alone
        assert together[0]["completion_tokens"] <= 2 and together[1]["completion_tokens"] <= 3
        assert batch_sizes[0] == len(jobs) and batch_sizes[-1] < len(jobs), batch_sizes
        assert batch_sizes == sorted(batch_sizes, reverse=True), batch_sizes
    finally:
        torch.set_num_threads(threads)


def test_a_body_over_max_request_bytes_gets_413_whether_declared_or_chunked(served):
    _, base_url = served
    url = f"{base_url}/v1/chat/completions"

    def body(size: int) -> bytes:
        empty = {"model": "psoups:P2A", "messages": [{"role": "user", "content": ""}]}
        padding = "x" * (size - len(json.dumps(empty)))
        raw = json.dumps({**empty, "messages": [{"role": "user", "content": padding}]})
        assert len(raw) == size
        return raw.encode()

    over = body(REQUEST_LIMIT + 1)
    declared = httpx.post(url, content=over, headers=HEADERS, timeout=60)
    chunks = (over[i : i + 4096] for i in range(0, len(over), 4096))  # no Content-Length
    chunked = httpx.post(url, content=chunks, headers=HEADERS, timeout=60)
    for response in (declared, chunked):
        assert response.status_code == 413, response.text
        message = response.json()["error"]["message"]
        assert "max_request_bytes" in message and str(REQUEST_LIMIT) in message
    # At the limit the body is parsed, and refused for its prompt's length instead.
    at_limit = httpx.post(url, content=body(REQUEST_LIMIT), headers=HEADERS, timeout=60)
    assert at_limit.status_code == 400 and "tokens" in at_limit.json()["error"]["message"]


def test_paths_in_a_request_are_refused(served):
    """Soups resolve against the catalog read at start (pole ids, tuned weights); nothing
    in a request is a path. Even the path of a real, loadable pole adapter is refused."""
    from psoups_ray.manifest import Manifest

    out, base_url = served
    adapter = RunDir(out).resolve(Manifest.load(RunDir(out)).data["policies"]["P2A"]["path"])
    for change in [
        {"model": "../../etc/passwd"},
        {"model": "psoups:/etc/passwd"},
        {"model": "psoups:../../etc/passwd"},
        {"model": "file:///etc/passwd"},
        {"model": f"psoups:{adapter}"},
        {"model": f"psoups:P3A+{adapter}"},
        {"preferences": [adapter]},
        {"preferences": ["P3A", "../P2A"]},
        {"weights": {adapter: 1.0}},
        {"weights": {"../../P2A": 1.0}},
        {"adapter_path": adapter},
    ]:
        for chat in (True, False):
            response = _chat(base_url, change, chat)
            assert response.status_code == 400, (change, response.text)
            assert response.json()["error"]["type"] == "invalid_request_error"


# -- property-based fuzzing of the HTTP API ----------------------------------------------
MISSING = object()  # drop the field
ANY_CHAR = st.characters() | st.characters(categories=["Cs"])  # lone surrogates too
POLE_WORDS = ["P2A", "P2B", "P3A", "P3B", "p3b ", "P1A", "P9Z", "base", "", "+", "P2A=0.5",
              "..", "/etc/passwd", "\ud800", "P2A\x00"]  # fmt: skip
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.sampled_from([2**63, 2**64, -(2**63) - 1, 10**400])
    | st.floats()  # NaN and Infinity too (json.dumps writes them; json.loads reads them)
    | st.text(ANY_CHAR, max_size=16)
    | st.sampled_from(POLE_WORDS)
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(ANY_CHAR, max_size=8),
                                                                inner, max_size=4),
    max_leaves=10,
)  # fmt: skip
MODELS = (
    st.lists(st.sampled_from(POLE_WORDS), max_size=4).map(lambda poles: "psoups:" + "+".join(poles))
    | st.text(ANY_CHAR, max_size=24).map(lambda text: "psoups:" + text)
    | st.text(ANY_CHAR, max_size=24)
)
FIELD_VALUES = {
    "model": MODELS,
    "messages": st.lists(
        st.fixed_dictionaries(
            {
                "role": st.sampled_from(["user", "system", "assistant", "robot"]) | JSON_VALUES,
                "content": st.text(ANY_CHAR, max_size=40) | JSON_VALUES,
            }
        ),
        max_size=3,
    ),
    "preferences": st.lists(st.sampled_from(POLE_WORDS), max_size=4),
    "weights": st.dictionaries(
        st.sampled_from(POLE_WORDS) | st.text(ANY_CHAR, max_size=6), SCALARS, max_size=3
    ),
    "max_tokens": st.integers(min_value=-5, max_value=60),
    "n": st.integers(min_value=-1, max_value=5),
    "stream": st.booleans(),
}
FIELDS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature",
          "top_p", "top_k", "n", "stop", "seed", "stream", "stream_options", "user",
          "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p", "min_tokens",
          "ignore_eos", "logprobs", "top_logprobs", "echo", "response_format", "preferences",
          "weights"]  # fmt: skip
RAW_BODIES = [
    b"", b"null", b"[" * 5000, b'{"max_tokens": ' + b"9" * 5000 + b"}",
    b'\xef\xbb\xbf{"model": "psoups:P2A"}', '{"model": "psoups:P2A"}'.encode("utf-16"),
    b'{"model": "psoups:\xed\xa0\x80"}',  # a surrogate encoded as UTF-8 bytes: invalid
]  # fmt: skip


@st.composite
def fuzzed_requests(draw) -> tuple[str, bytes, bool, dict[str, str | bytes]]:
    """(path, body, send chunked, headers): a valid small request with fields dropped or
    replaced by values of any type, any JSON at all, a body around the size limit, invalid
    UTF-8 or truncated JSON, and now and then a malformed Authorization header."""
    chat = draw(st.booleans())
    path = "/v1/chat/completions" if chat else "/v1/completions"
    shape = draw(st.sampled_from(["fields", "fields", "any", "huge", "raw"]))
    if shape == "any":
        raw = json.dumps(draw(JSON_VALUES)).encode()
    elif shape == "raw":
        raw = draw(st.sampled_from(RAW_BODIES))
    else:
        body: dict = {"model": "psoups:P2A", "max_tokens": 4}
        body.update({"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"})
        for field in draw(st.lists(st.sampled_from(FIELDS), unique=True, max_size=3)):
            value = draw(FIELD_VALUES.get(field, JSON_VALUES) | JSON_VALUES | st.just(MISSING))
            if value is MISSING:
                body.pop(field, None)
            else:
                body[field] = value
        if shape == "huge":
            field = draw(st.sampled_from(["model", "user", "stop", "prompt"]))
            body[field] = "x" * draw(st.integers(REQUEST_LIMIT - 300, REQUEST_LIMIT + 3000))
        raw = json.dumps(body).encode()  # ensure_ascii: a lone surrogate travels as \ud800
        damage = draw(st.sampled_from(["none", "none", "none", "bad utf-8", "truncated"]))
        cut = draw(st.integers(0, len(raw)))
        if damage == "bad utf-8":
            raw = raw[:cut] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80"])) + raw[cut:]
        elif damage == "truncated":
            raw = raw[:cut]
    headers: dict[str, str | bytes] = dict(HEADERS)
    if draw(st.sampled_from([False] * 7 + [True])):
        latin1 = st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f")
        token = draw(st.text(latin1, max_size=12))  # non-ASCII too
        headers["Authorization"] = f"Bearer {token}".rstrip().encode("latin-1")
    return path, raw, draw(st.booleans()), headers


def _assert_handled(response: httpx.Response, body: bytes, authorized: bool) -> None:
    """2xx or 4xx, never 5xx; an error has an OpenAI-style JSON body; a stream ends well."""
    assert response.status_code < 500, response.text[:1000]
    if authorized and len(body) > REQUEST_LIMIT:
        assert response.status_code == 413, response.text[:1000]
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["message"] and error["type"], error
    elif response.headers["content-type"].startswith("text/event-stream"):
        assert '"server_error"' not in response.text
        assert response.text.endswith("data: [DONE]\n\n"), response.text[-500:]
    else:
        assert response.json()["choices"], response.text[:1000]


def test_fuzzed_requests_get_a_2xx_or_4xx_and_the_replica_survives(served):
    _, base_url = served
    replica = _replica_pid()
    with httpx.Client(base_url=base_url, timeout=60) as client:  # a hang fails the example

        @settings(
            max_examples=150,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(request=fuzzed_requests())
        def fuzz(request):
            path, body, chunked, headers = request
            content = iter([body[: len(body) // 2], body[len(body) // 2 :]]) if chunked else body
            response = client.post(path, content=content, headers=headers)
            _assert_handled(response, body, headers["Authorization"] == HEADERS["Authorization"])

        fuzz()
        good = client.post(
            "/v1/chat/completions", headers=HEADERS,
            json={"model": "psoups:P2A+P3B", "messages": [{"role": "user", "content": QUESTION}],
                  "max_tokens": 4},
        )  # fmt: skip
    assert good.status_code == 200 and good.json()["choices"][0]["message"]["content"] is not None
    assert _replica_pid() == replica  # the same replica process served every request


def test_merged_strategy_serves_the_same_soups_through_an_lru_of_merged_copies(served):
    """strategy=merged (cache of one merged copy): the same text as the mixing app for
    every soup, while alternating soups evict each other."""
    from ray import serve

    from psoups_ray.serve.app import bind_app

    out, base_url = served
    app = bind_app(
        {"run": str(out), "strategy": "merged", "merged_cache_size": 1, "max_tokens": 48},
        {"SoupModel": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}},
         "Ingress": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.05}}},
    )  # fmt: skip
    serve.run(app, name="psoups-merged", route_prefix="/merged")
    try:
        mixing = _client(base_url)
        merged = openai.OpenAI(base_url=f"{base_url}/merged/v1", api_key="x", max_retries=0)
        for model in ["psoups:P2A+P3B", "psoups:P2B+P3A", "psoups:P2A+P3B", "psoups:base"]:
            request = dict(
                model=model,
                messages=[{"role": "user", "content": QUESTION}],
                max_tokens=20,
                temperature=0,
            )
            expected = mixing.chat.completions.create(**request).choices[0].message.content
            got = merged.chat.completions.create(**request).choices[0].message.content
            assert got == expected, model
        chunks = merged.chat.completions.create(**request | {"model": "psoups:P2B"}, stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        one = mixing.chat.completions.create(**request | {"model": "psoups:P2B"})
        assert streamed == one.choices[0].message.content
        handle = serve.get_deployment_handle("SoupModel", app_name="psoups-merged")
        info = handle.info.remote().result()
        assert info["strategy"] == "merged"
        assert info["merges"] == 4  # P2A+P3B, P2B+P3A, P2A+P3B again (evicted), P2B
    finally:
        serve.delete("psoups-merged")


def test_psoups_serve_runs_in_the_foreground_and_stops_on_sigterm(served, tmp_path):
    out, _ = served
    port = free_port()
    env = {**os.environ, "RAY_ADDRESS": "local"}  # its own local cluster, not the test's
    env.pop(TOKEN_ENV, None)
    process = subprocess.Popen(
        [sys.executable, "-m", "psoups_ray", "serve", "--run", str(out), "--port", str(port),
         "--config", "serve_configs/tiny.yaml"],
        cwd=Path(__file__).resolve().parents[1], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        models = None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5)
                if models.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        assert models is not None and models.status_code == 200, process.poll()
        assert "psoups:P2A" in json.dumps(models.json())
        for stream in (False, False, True):  # whole answers, then a stream
            body = {"model": "psoups:P2A", "max_tokens": 6, "stream": stream,
                    "messages": [{"role": "user", "content": QUESTION}]}  # fmt: skip
            answer = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body,
                                timeout=60)  # fmt: skip
            assert answer.status_code == 200, answer.text
        time.sleep(2)  # the replica's log lines reach this process
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
        assert process.returncode == 0, output[-3000:]
        assert "stopping the Serve application" in output
        # nothing that looks like an error when nothing failed
        assert "never retrieved" not in output and "Traceback" not in output, output[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)


def test_a_killed_model_replica_is_replaced_and_only_its_requests_fail(served, ray_cluster):
    """bench/serve_load.py fault: clients keep sending small requests to an app of its own
    while its one SoupModel replica is SIGKILLed; Serve starts a replacement."""
    from ray import serve

    from psoups_ray.serve.app import bind_app

    out, base_url = served
    app = bind_app(
        {"run": str(out), "max_tokens": 16},
        {"SoupModel": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}},
         "Ingress": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.05}}},
    )  # fmt: skip
    serve.run(app, name="psoups-fault", route_prefix="/fault")
    try:
        before = _replica_pid("psoups-fault")
        clients = 4
        result = subprocess.run(
            [sys.executable, "bench/serve_load.py", "fault", "--url", f"{base_url}/fault",
             "--app", "psoups-fault", "--pid", str(before),
             "--concurrency", str(clients), "--kill-after", "4", "--max-tokens", "8",
             "--recovery-timeout", "120", "--timeout", "150"],
            cwd=REPO, capture_output=True, text=True, timeout=400,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        stats = json.loads(result.stdout.split("FAULT ", 1)[1].splitlines()[0])
        assert stats["killed_pid"] == before and stats["recovery_s"] <= 120, stats
        # Requests sent meanwhile wait for the replacement, within the client timeout.
        assert stats["timeouts"] == 0 and stats["max_latency_s"] < 150, stats
        # Only the requests the killed replica held fail, and fast. The margin: a request
        # sent right after the kill may still be routed to the dead replica before the
        # router hears of its death (at most one per client: that failure tells it).
        assert stats["failed_before_kill"] == 0, stats
        assert stats["failed"] <= stats["in_flight_at_kill"] + clients, stats
        assert stats["max_failed_latency_s"] < 30, stats
        after = _replica_pid("psoups-fault")
        assert after != before
        response = _chat(f"{base_url}/fault", {})
        assert response.status_code == 200, response.text
    finally:
        serve.delete("psoups-fault")


def _ray_cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", TOKEN_ENV)}
    return {**env, **extra}


def test_serve_run_of_the_shipped_config_deploys_and_answers(served, tmp_path):
    """Ray's own CLI, `serve run serve_configs/tiny.yaml`, in the foreground on a local
    cluster of its own (its temp dir, so the test stops exactly what it started)."""
    out, _ = served
    port = free_port()
    config = shipped_serve_config(tmp_path, out, port)
    temp_root = tempfile.mkdtemp(prefix="psr-", dir="/tmp")  # short: socket paths
    process = subprocess.Popen(
        [SERVE_CLI, "run", str(config)],
        cwd=REPO, env=_ray_cli_env(RAY_TMPDIR=temp_root),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        answer = first_chat_answer(
            f"http://127.0.0.1:{port}", lambda: process.poll() is None, QUESTION
        )
        assert answer["model"] == "psoups:P2A+P3B"
        assert answer["psoups"] == {"weights": TUNED, "source": "tuned"}
        assert answer["choices"][0]["message"]["content"] == _engine_text(
            out, "psoups:P2A+P3B", QUESTION, 8
        )
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
        stop_processes_naming(temp_root)
        shutil.rmtree(temp_root, ignore_errors=True)


def test_a_moved_run_serves_and_reports_and_a_missing_artifact_is_one_clear_error(served, tmp_path):
    """Locations are recorded relative to the run directory: a run copied elsewhere, the
    copy it came from removed, serves and reports unchanged. An artifact gone from a run
    stops `psoups serve` before Ray starts, with one message naming it."""
    from ray import serve

    from psoups_ray.__main__ import main
    from psoups_ray.serve.app import bind_app

    out, base_url = served
    first, moved = tmp_path / "first", tmp_path / "elsewhere" / "run"
    shutil.copytree(out, first)
    shutil.copytree(first, moved)
    shutil.rmtree(first)
    assert main(["report", "--run", str(moved)]) == 0
    assert (moved / "report.md").read_text().startswith("# P-Soups report")
    app = bind_app(
        {"run": str(moved), "max_tokens": 16},
        {"SoupModel": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}},
         "Ingress": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.05}}},
    )  # fmt: skip
    serve.run(app, name="psoups-moved", route_prefix="/moved")
    try:
        answer = _chat(f"{base_url}/moved", {"model": "psoups:P2A+P3B", "temperature": 0})
        assert answer.status_code == 200, answer.text
        assert answer.json()["psoups"] == {"weights": TUNED, "source": "tuned"}
    finally:
        serve.delete("psoups-moved")

    shutil.rmtree(moved / "policies" / "P3A")
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "psoups_ray", "serve", "--run", str(moved),
         "--port", str(free_port())],
        cwd=REPO, env=_ray_cli_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "cannot be loaded" in errors[0] and "policy P3A" in errors[0]
    assert str(moved / "policies" / "P3A" / "adapter") in errors[0] and "--force" in errors[0]
    assert "Traceback" not in result.stderr and time.monotonic() - started < 60


def test_the_api_as_clients_send_it_content_parts_developer_role_logprobs(served):
    """The official openai client: content as text parts and a developer message (OpenAI's
    newer system role) give what the plain system and string forms give; logprobs are the
    sampled tokens' with the asked top alternatives, streamed or not."""
    _, base_url = served
    client = _client(base_url)
    common = dict(model="psoups:P2A+P3B", max_tokens=10, temperature=0)
    parts = client.chat.completions.create(
        messages=[{"role": "developer", "content": "Answer briefly."},
                  {"role": "user", "content": [{"type": "text", "text": "What is"},
                                               {"type": "text", "text": "salt?"}]}],
        logprobs=True, top_logprobs=2, **common,
    )  # fmt: skip
    plain = client.chat.completions.create(
        messages=[{"role": "system", "content": "Answer briefly."},
                  {"role": "user", "content": "What is\nsalt?"}], **common,
    )  # fmt: skip
    text = parts.choices[0].message.content
    assert text == plain.choices[0].message.content and text
    content = parts.choices[0].logprobs.content
    assert "".join(entry.token for entry in content) == text
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.logprob <= 0
        # greedy: the chosen token is the most likely one
        assert entry.logprob == pytest.approx(max(t.logprob for t in entry.top_logprobs), abs=1e-5)
        assert entry.bytes == list(entry.token.encode())
    streamed = client.chat.completions.create(
        messages=[{"role": "developer", "content": "Answer briefly."},
                  {"role": "user", "content": "What is\nsalt?"}],
        logprobs=True, top_logprobs=2, stream=True, **common,
    )  # fmt: skip
    chunks = [c for c in streamed if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    pieces = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in pieces] == [e.token for e in content]
    assert [e.logprob for e in pieces] == pytest.approx([e.logprob for e in content], abs=1e-5)


def test_completions_echo_the_prompts_logprobs_for_evaluation_harnesses(served):
    """/v1/completions with echo and logprobs (what lm-eval-harness's loglikelihood sends,
    token ids or text): the prompt's log-probabilities under the soup, equal to the
    engine's, then the sampled tokens'."""
    import torch

    from psoups_ray.serve.engine import GenerationJob, SamplingParams, SoupEngine

    out, base_url = served
    engine = SoupEngine(str(out), device="cpu")
    soup = engine.catalog.resolve("psoups:P2A").weights
    ids = list(engine.sampler.encode(["Salt is a mineral that we eat."])[0])
    job = GenerationJob("", soup, SamplingParams(1), tuple(ids))
    threads = torch.get_num_threads()
    try:
        expected = engine.sampler.prompt_logprobs([engine.request_of(job)], top=1)[0]
    finally:
        torch.set_num_threads(threads)
    for prompt, max_tokens in ((ids, 0), ([ids], 1), (engine.tokenizer.decode(ids), 1)):
        body = {"model": "psoups:P2A", "prompt": prompt, "max_tokens": max_tokens, "echo": True,
                "logprobs": 1, "temperature": 0, "seed": 3}  # fmt: skip
        answer = httpx.post(f"{base_url}/v1/completions", json=body, headers=HEADERS, timeout=60)
        assert answer.status_code == 200, answer.text
        choice = answer.json()["choices"][0]
        logprobs = choice["logprobs"]
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        scored = logprobs["token_logprobs"][1 : len(ids)]
        assert scored == pytest.approx([lp for lp, _ in expected[1:]], abs=1e-4)
        assert len(logprobs["tokens"]) == len(ids) + max_tokens
        assert choice["text"].startswith(engine.tokenizer.decode(ids))
        assert logprobs["text_offset"] == sorted(logprobs["text_offset"])
    refused = httpx.post(
        f"{base_url}/v1/completions", headers=HEADERS, timeout=60,
        json={"model": "psoups:P2A", "prompt": ids, "max_tokens": 0},
    )  # fmt: skip
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_tokens"
    assert "echo" in refused.json()["error"]["message"]


def test_vllm_sampling_fields_health_and_version(served):
    _, base_url = served
    long = _chat(base_url, {"max_tokens": 12, "ignore_eos": True, "min_p": 0.05,
                            "repetition_penalty": 1.2, "frequency_penalty": 0.5,
                            "presence_penalty": 0.5, "top_k": 20, "user": "alice"})  # fmt: skip
    assert long.status_code == 200, long.text
    assert long.json()["usage"]["completion_tokens"] == 12
    assert long.json()["choices"][0]["finish_reason"] == "length"
    held = _chat(base_url, {"max_tokens": 12, "min_tokens": 12, "seed": 4})
    assert held.json()["usage"]["completion_tokens"] == 12
    text_format = _chat(base_url, {"response_format": {"type": "text"}, "top_k": -1})
    assert text_format.status_code == 200, text_format.text
    assert httpx.get(f"{base_url}/health", timeout=30).json()["status"] == "ok"
    from psoups_ray import __version__

    assert httpx.get(f"{base_url}/version", timeout=30).json()["version"] == __version__


def test_request_token_latency_and_batch_metrics_are_exported_to_prometheus(served, ray_cluster):
    """Ray Serve's metrics, on the node's Prometheus endpoint."""
    import ray

    _, base_url = served
    assert _chat(base_url, {"max_tokens": 3}).status_code == 200
    port = ray.nodes()[0]["MetricsExportPort"]
    wanted = ["ray_psoups_requests", "ray_psoups_request_latency_s_bucket",
              "ray_psoups_completion_tokens", "ray_psoups_decode_batch_rows_bucket"]  # fmt: skip
    deadline, text = time.monotonic() + 90, ""
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if all(name in text for name in wanted):
            break
        time.sleep(3)
    missing = [name for name in wanted if name not in text]
    assert not missing, missing
    line = next(ln for ln in text.splitlines()
                if ln.startswith("ray_psoups_requests") and 'status="200"' in ln)  # fmt: skip
    assert float(line.rsplit(" ", 1)[1]) >= 1


LM_EVAL_TASK = """\
task: psoups_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def test_lm_eval_harness_runs_a_loglikelihood_task_against_psoups_serve(served, tmp_path):
    """lm-eval-harness's `local-completions` model, a multiple-choice task from a local data
    file (nothing from a hub): its loglikelihood requests (token ids, echo, logprobs) are
    answered, and it scores every question."""
    out, base_url = served
    questions = [
        {"question": "What is salt?", "choices": [" a mineral", " a planet"], "answer": 0},
        {"question": "Why is the sky blue?", "choices": [" light scatters", " paint"],
         "answer": 0},
        {"question": "When does water boil?", "choices": [" at 100 degrees", " never"],
         "answer": 0},
    ]  # fmt: skip
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in questions))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "psoups_local_mc.yaml").write_text(LM_EVAL_TASK.format(data=data))
    tokenizer = RunArtifacts.load(out).base.local_tokenizer()
    model_args = ",".join([
        "model=psoups:P2A+P3B", f"base_url={base_url}/v1/completions",
        "tokenizer_backend=huggingface", f"tokenizer={tokenizer}", "num_concurrent=1",
        "max_retries=1",
    ])  # fmt: skip
    result = subprocess.run(
        [str(Path(sys.executable).with_name("lm_eval")), "--model", "local-completions",
         "--model_args", model_args, "--tasks", "psoups_local_mc", "--include_path",
         str(tasks), "--output_path", str(tmp_path / "results")],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**_ray_cli_env(), "OPENAI_API_KEY": TOKEN, "HF_HUB_OFFLINE": "1",
             "HF_DATASETS_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (results_file,) = (tmp_path / "results").rglob("results_*.json")
    scores = json.loads(results_file.read_text())["results"]["psoups_local_mc"]
    assert 0.0 <= scores["acc,none"] <= 1.0
