"""Personal soups over real HTTP: the app on the session's Ray cluster learns each user's
soup from the user's choices, keeps profiles in SQLite (the run directory's file) or in a
PostgreSQL server the test starts, and serves a user's soup by the OpenAI ``user`` field."""

from __future__ import annotations

import os
import random
import shutil
import sqlite3
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from clusters import free_port
from postgres import PostgresServer

from psoups_ray.artifacts import RunArtifacts
from psoups_ray.world import TinyWorld

pytestmark = pytest.mark.integration

TOKEN_ENV = "PSOUPS_TEST_PERSONAL_KEY"
TOKEN = "personal-secret"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}
POLES = {"P2A", "P2B", "P3A", "P3B"}
ARGS = {"max_tokens": 32, "default_max_tokens": 16, "max_prompt_tokens": 64,
        "auth_token_env": TOKEN_ENV, "personal": {"max_text_tokens": 256}}  # fmt: skip
DEPLOYMENTS = {
    "SoupModel": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}},
    "Ingress": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.05}},
    "PreferenceScorer": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}},
}


@pytest.fixture(scope="module")
def personal_app(policy_run, tmp_path_factory):
    """The app over a copy of the session's run (P2 x P3), profiles in its SQLite file."""
    from ray import serve

    from psoups_ray.serve.app import bind_app

    source, _ = policy_run
    out = tmp_path_factory.mktemp("personal") / "run"
    shutil.copytree(source, out)
    os.environ[TOKEN_ENV] = TOKEN
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        app = bind_app({"run": str(out), **ARGS}, DEPLOYMENTS)
        serve.run(app, name="personal", route_prefix="/")
    except BaseException:
        serve.shutdown()
        raise
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=HEADERS, timeout=120)
    try:
        yield out, client
    finally:
        client.close()
        serve.shutdown()
        os.environ.pop(TOKEN_ENV, None)


def _choice(rng: random.Random, prompt: str, liked: str, disliked: str) -> dict[str, str]:
    """Two tiny-world answers to ``prompt`` that differ only in dimension P2."""
    world = TinyWorld(seed=0)
    poles = {"P1": "P1A", "P3": rng.choice(["P3A", "P3B"])}
    seed = rng.randrange(10**6)
    chosen = world.respond(prompt, {**poles, "P2": liked}, random.Random(seed))
    rejected = world.respond(prompt, {**poles, "P2": disliked}, random.Random(seed))
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def test_a_users_choices_become_the_soup_served_for_that_user(personal_app):
    out, client = personal_app
    assert client.get("/v1/users/alice").status_code == 404
    listed = [model["id"] for model in client.get("/v1/models").json()["data"]]
    assert listed[-1] == "psoups" and "psoups:P2A+P3B" not in listed  # no tuned weights here

    question = client.post("/v1/users/alice/query", json={})
    assert question.status_code == 200, question.text
    body = question.json()
    held_out = RunArtifacts.load(out).prompts("held_out")
    assert body["prompt"] in held_out
    ids = [candidate["id"] for candidate in body["candidates"]]
    assert ids == ["a", "b"]
    for candidate in body["candidates"]:
        assert isinstance(candidate["text"], str)
        assert set(candidate["weights"]) <= POLES and sum(candidate["weights"].values()) > 0
    assert body["candidates"][0]["weights"] != body["candidates"][1]["weights"]
    own = client.post("/v1/users/alice/query", json={"prompt": "What is salt?", "max_tokens": 8})
    assert own.status_code == 200 and own.json()["prompt"] == "What is salt?"
    assert client.get("/v1/users/alice").status_code == 404  # questions create no user

    # Alice keeps preferring the concise answer (P2A) to the informative one (P2B).
    rng = random.Random(0)
    for count in range(1, 7):
        answer = client.post(
            "/v1/users/alice/choices", json=_choice(rng, held_out[count], "P2A", "P2B")
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["user"] == "alice" and answer.json()["choices"] == count
    profile = client.get("/v1/users/alice").json()
    assert profile["choices"] == 6 and set(profile["uncertainty"]) == POLES
    weights = profile["weights"]
    assert weights.get("P2A", 0) > 0.3 and "P2B" not in weights, weights

    # model "psoups" + user: Alice's soup, exactly as if its weights had been sent.
    chat = {"model": "psoups", "user": "alice", "max_tokens": 12, "temperature": 0,
            "messages": [{"role": "user", "content": "What is salt?"}]}  # fmt: skip
    served = client.post("/v1/chat/completions", json=chat)
    assert served.status_code == 200, served.text
    assert served.json()["psoups"] == {"weights": weights, "source": "user"}
    assert served.json()["model"] == "psoups:user:alice"
    given = {**chat, "model": "psoups:base", "weights": weights}
    del given["user"]
    same = client.post("/v1/chat/completions", json=given).json()
    assert same["choices"][0]["message"] == served.json()["choices"][0]["message"]
    completion = client.post(
        "/v1/completions",
        json={"model": "psoups", "user": "alice", "prompt": "Salt is", "max_tokens": 4},
    )
    assert completion.json()["psoups"]["source"] == "user"
    # A user with no choices gets the default soup (the base).
    newcomer = client.post("/v1/chat/completions", json={**chat, "user": "newcomer"}).json()
    assert newcomer["psoups"] == {"weights": {}, "source": "default"}

    # Delete: every record of Alice goes, Bob's stay.
    bob = client.post("/v1/users/bob/choices", json=_choice(rng, held_out[9], "P2B", "P2A"))
    assert bob.status_code == 200 and bob.json()["choices"] == 1, bob.text
    assert client.delete("/v1/users/alice").status_code == 204
    assert client.get("/v1/users/alice").status_code == 404
    assert client.delete("/v1/users/alice").status_code == 404
    database = sqlite3.connect(out / "personal" / "profiles.sqlite")
    rows = {
        table: database.execute(f"SELECT user_id FROM {table}").fetchall()
        for table in ("psoups_users", "psoups_choices")
    }
    database.close()
    assert rows == {"psoups_users": [("bob",)], "psoups_choices": [("bob",)]}


@pytest.mark.parametrize(
    "path, body, status, param",
    [
        ("/v1/users/bad%20user!/choices", {"prompt": "q", "chosen": "a", "rejected": "b"}, 400,
         "user"),
        (f"/v1/users/{'x' * 129}/choices", {"prompt": "q", "chosen": "a", "rejected": "b"}, 400,
         "user"),
        ("/v1/users/carol/choices", {"prompt": "q", "chosen": " ", "rejected": "b"}, 400,
         "chosen"),
        ("/v1/users/carol/choices", {"prompt": "q", "chosen": "same", "rejected": "same"}, 400,
         "rejected"),
        ("/v1/users/carol/choices", {"prompt": "salt " * 200, "chosen": "a", "rejected": "b"},
         400, "prompt"),
        ("/v1/users/carol/choices", {"prompt": "q", "chosen": "a " * 300, "rejected": "b"}, 400,
         "chosen"),
        ("/v1/users/carol/choices", {"prompt": "q", "chosen": "a"}, 400, "rejected"),
        ("/v1/users/carol/choices", {"prompt": "q", "chosen": "a", "rejected": "b", "x": 1},
         400, "x"),
        ("/v1/users/carol/choices", {"prompt": 3, "chosen": "a", "rejected": "b"}, 400,
         "prompt"),
        ("/v1/users/carol/query", {"max_tokens": 10_000}, 400, "max_tokens"),
        ("/v1/users/carol/query", {"max_tokens": 0}, 400, "max_tokens"),
        ("/v1/users/carol/query", {"prompt": ""}, 400, "prompt"),
        ("/v1/chat/completions", {"model": "psoups", "messages": [{"role": "user",
         "content": "hi"}]}, 400, "user"),
        ("/v1/chat/completions", {"model": "psoups", "user": "no spaces please",
         "messages": [{"role": "user", "content": "hi"}]}, 400, "user"),
    ],
)  # fmt: skip
def test_bad_requests_get_a_400_naming_the_field_and_write_nothing(
    personal_app, path, body, status, param
):
    _, client = personal_app
    response = client.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert client.get("/v1/users/carol").status_code == 404  # nothing half-written


def test_users_need_the_token_and_bodies_must_be_json(personal_app):
    _, client = personal_app
    bare = httpx.post(str(client.base_url.join("/v1/users/dan/choices")), json={}, timeout=60)
    assert bare.status_code == 401
    assert httpx.get(str(client.base_url.join("/v1/users/dan")), timeout=60).status_code == 401
    broken = client.post("/v1/users/dan/choices", content=b"{not json")
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]["message"]


def test_replicas_share_a_postgresql_store_and_a_redeploy_loses_nothing(personal_app):
    """Two ingress replicas over one PostgreSQL database (the test's own server): choices
    for one user sent at once, through both, are all kept; the app deleted and deployed
    again finds the profile as it was."""
    from ray import serve

    from psoups_ray.serve.app import bind_app

    out, client = personal_app
    rng = random.Random(1)
    prompts = TinyWorld(seed=0).eval_prompts
    with PostgresServer() as server:
        args = {"run": str(out), **ARGS, "personal": {**ARGS["personal"], "database": server.url}}
        deployments = {**DEPLOYMENTS, "Ingress": {**DEPLOYMENTS["Ingress"], "num_replicas": 2}}
        try:
            serve.run(bind_app(args, deployments), name="personal-pg", route_prefix="/pg")
            bodies = [_choice(rng, prompts[i], "P2B", "P2A") for i in range(10)]
            with ThreadPoolExecutor(max_workers=5) as pool:
                answers = list(
                    pool.map(lambda b: client.post("/pg/v1/users/erin/choices", json=b), bodies)
                )
            assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
            assert sorted(a.json()["choices"] for a in answers) == list(range(1, 11))
            before = client.get("/pg/v1/users/erin").json()
            assert before["choices"] == 10 and before["weights"].get("P2B", 0) > 0.3, before
            assert client.get("/v1/users/erin").status_code == 404  # the other store
            serve.delete("personal-pg")
            serve.run(bind_app(args, deployments), name="personal-pg", route_prefix="/pg")
            assert client.get("/pg/v1/users/erin").json() == before
        finally:
            serve.delete("personal-pg")


def _browser():
    """Headless Chromium driven by Selenium (Debian's chromium and chromium-driver; ./dev
    installs them where they are missing)."""
    from selenium import webdriver

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (binary and driver):
        raise RuntimeError("no chromium / chromedriver: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(driver))


def test_the_playground_chats_compares_and_learns_in_a_real_browser(personal_app):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.wait import WebDriverWait

    _, client = personal_app
    browser = _browser()
    wait = WebDriverWait(browser, 120)
    try:
        browser.get(str(client.base_url.join("/playground")))
        wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
        sliders = browser.find_elements(By.CSS_SELECTOR, "#poles input[type=range]")
        assert {s.get_attribute("data-pole") for s in sliders} == POLES
        browser.find_element(By.ID, "token").send_keys(TOKEN)
        name = browser.find_element(By.ID, "user")
        name.clear()
        name.send_keys("pat")

        # Chat with a soup set on the sliders (P2B then P2A: one clears the other).
        for pole, value in (("P2B", "2"), ("P2A", "1.5"), ("P3B", "0.5")):
            browser.execute_script(
                "const s = arguments[0]; s.value = arguments[1];"
                "s.dispatchEvent(new Event('input', {bubbles: true}));",
                browser.find_element(By.ID, f"w-{pole}"), value,
            )  # fmt: skip
        browser.find_element(By.ID, "send").click()
        used = browser.find_element(By.ID, "chat-used")
        wait.until(lambda b: "given" in used.text)
        assert used.text == "soup: P2A 1.50, P3B 0.50 (given)"
        assert browser.find_element(By.ID, "chat-answer").text.strip()

        # Three comparisons: the page shows two answers, a click feeds the profile.
        summary = browser.find_element(By.ID, "profile-summary")
        browser.find_element(By.ID, "ask").click()
        for count in range(1, 4):  # after each choice the page asks the next question
            wait.until(lambda b: b.find_element(By.ID, "prefer-a").is_enabled())
            a, b = (browser.find_element(By.ID, f"answer-{side}").text for side in "ab")
            assert a.strip() and a != b, (a, b)  # two different answers side by side
            browser.find_element(By.ID, "prefer-a").click()
            wait.until(lambda b, n=count: summary.text.startswith(f"{n} choice"))
        profile = client.get("/v1/users/pat").json()
        assert profile["choices"] == 3
        bars = {
            bar.get_attribute("data-pole"): float(bar.get_attribute("data-weight"))
            for bar in browser.find_elements(By.CSS_SELECTOR, "#profile-bars .bar")
        }
        assert set(bars) == POLES
        assert {p: w for p, w in bars.items() if w} == pytest.approx(profile["weights"], abs=1e-6)

        # Chat with the learned soup, then forget it.
        browser.find_element(By.ID, "as-user").click()
        browser.find_element(By.ID, "send").click()
        wait.until(lambda b: "(user)" in used.text)
        browser.find_element(By.ID, "forget").click()
        wait.until(lambda b: summary.text == "no choices yet")
        assert client.get("/v1/users/pat").status_code == 404
        # No script error; the only failed loads are the API's 404s for "pat" before its
        # first choice and after "forget me".
        errors = [
            entry
            for entry in browser.get_log("browser")
            if entry["level"] == "SEVERE"
            and not (
                entry["source"] == "network"
                and "/v1/users/pat " in entry["message"]
                and "404" in entry["message"]
            )  # fmt: skip
        ]
        assert not errors, errors
    finally:
        browser.quit()
