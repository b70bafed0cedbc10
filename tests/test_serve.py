"""Ray Serve for real: the OpenAI-compatible app over the smoke run's pole policies,
driven over HTTP on 127.0.0.1 with the official openai client and raw requests."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from psoups_ray.rundir import RunDir

pytestmark = pytest.mark.integration

TOKEN_ENV = "PSOUPS_TEST_API_KEY"
TOKEN = "test-secret"
TUNED = {"P2A": 0.8, "P3B": 0.2}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(policy_run, tmp_path_factory):
    """The app on the session's Ray cluster, for a copy of the policy run with tuned
    weights for one combination; stopped after the module."""
    from ray import serve

    from psoups_ray.manifest import Manifest
    from psoups_ray.serving.app import build_app

    source, _ = policy_run
    out = tmp_path_factory.mktemp("serve") / "run"
    shutil.copytree(source, out)
    manifest = Manifest.load(RunDir(out))
    manifest.data["tuned_weights"] = {"P2A+P3B": TUNED}
    manifest.save()
    port = _free_port()
    os.environ[TOKEN_ENV] = TOKEN
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app(
        {"run": str(out), "max_tokens": 48, "default_max_tokens": 16, "max_prompt_tokens": 64,
         "max_n": 3, "auth_token_env": TOKEN_ENV},
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
    from psoups_ray.serving.engine import GenerationJob, SamplingParams, SoupEngine

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
    assert extra == {"weights": TUNED, "weights_from": "tuned"}
    assert choice.message.content == _engine_text(out, "psoups:P2A+P3B", QUESTION, 24)
    # A combination without tuned weights is served as the uniform soup.
    uniform = client.chat.completions.create(
        model="psoups:P2B+P3A", messages=[{"role": "user", "content": QUESTION}], max_tokens=4
    )
    assert uniform.model_extra["psoups"] == {
        "weights": {"P2B": 0.5, "P3A": 0.5},
        "weights_from": "uniform",
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


def test_merged_strategy_serves_the_same_soups_through_an_lru_of_merged_copies(served):
    """strategy=merged (cache of one merged copy): the same text as the mixing app for
    every soup, while alternating soups evict each other."""
    from ray import serve

    from psoups_ray.serving.app import build_app

    out, base_url = served
    app = build_app(
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
    port = _free_port()
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
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
        assert process.returncode == 0, output[-3000:]
        assert "stopping the Serve application" in output
    finally:
        if process.poll() is None:
            process.kill()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
