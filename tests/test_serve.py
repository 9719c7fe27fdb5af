"""Serving: the pieces without Ray first, then one real Serve application over HTTP.

The served model is a tiny attention model put into a temporary MLflow registry by
`pipelines.train.publish` (the driver's own logging path); references are computed in this process
with the model the server's loader rebuilds, so an HTTP answer is checked against the model itself.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from net_helpers import free_port
from pydantic import ValidationError
from ray.serve import Application

from memory_models.model import SequenceModelConfig
from memory_models.registry import REGISTRY, memory_config
from pipelines.experiment import apply_overrides
from pipelines.recipes import debug
from serve import codec
from serve.api import text_tokens
from serve.app import build_app
from serve.args import API_KEY_ENV, ServeArgs
from serve.batching import Step, run_steps
from serve.client import MemlabClient, MemlabHTTPError
from serve.errors import InvalidField, SessionGone, SessionNotFound, Unavailable
from serve.store import SessionTable, StoreLimits

# Tests without Ray take seconds; those on Ray carry their own, longer limits.
pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]
APP = "memlab-test"
KEY = "test-key-5f1c"
FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def test_serve_config_file_is_valid_for_rays_schema():
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((ROOT / "cluster" / "serve-config.yaml").read_text())
    config = ServeDeploySchema.model_validate(raw)
    assert config.http_options.host == "127.0.0.1"
    (application,) = config.applications
    assert application.import_path == "serve.app:build_app"
    args = ServeArgs.model_validate(application.args)
    assert args.model_uri.endswith("@champion")
    assert args.api_key_file is not None and args.api_key is None  # a file, never the key itself
    deployments = {deployment.name: deployment for deployment in application.deployments}
    assert set(deployments) == {"MemlabModel", "MemlabIngress"}  # names serve.app defines
    model = deployments["MemlabModel"]
    assert model.autoscaling_config["max_replicas"] >= 1
    assert model.max_ongoing_requests > 0 and model.max_queued_requests > 0
    # The model is rebuilt from its own stored config: no hyperparameter is restated here.
    text = yaml.safe_dump(application.args)
    for field in ("d_model", "n_layers", "memory_size", "vocab_size", "kind"):
        assert field not in text


def test_serve_args_are_strict_and_keep_the_key_secret(monkeypatch):
    with pytest.raises(ValidationError, match="modle_uri"):
        build_app({"modle_uri": "models:/x@champion"})
    with pytest.raises(ValidationError, match="blank"):
        ServeArgs(api_key=" ")
    args = ServeArgs(api_key="hunter2-key")
    assert "hunter2" not in repr(args) and "hunter2" not in args.model_dump_json()
    monkeypatch.setenv(API_KEY_ENV, "from-the-env")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    resolved = ServeArgs().resolved()
    assert resolved.requires_api_key
    assert resolved.api_key.get_secret_value() == "from-the-env"
    assert resolved.tracking_uri.startswith("sqlite:////")  # absolute: replicas run elsewhere
    assert isinstance(build_app({"model_uri": "models:/m@champion"}), Application)
    assert ServeArgs(api_key="mine").resolved().api_key.get_secret_value() == "mine"


def test_a_model_uri_that_leads_nowhere_fails_before_deploying(tmp_path):
    from serve.loading import ModelLoadError
    from serve.local import start_local

    with pytest.raises(ModelLoadError, match="not a memlab checkpoint"):
        start_local(ServeArgs(model_uri=str(tmp_path)))
    tracking = f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    with pytest.raises(ModelLoadError, match="cannot find model 'models:/nope@champion'"):
        start_local(ServeArgs(model_uri="models:/nope@champion", tracking_uri=tracking))


def test_text_is_bytes_for_byte_models_and_refused_otherwise():
    assert text_tokens("hé", 256) == [104, 195, 169]
    with pytest.raises(InvalidField, match="not text") as refused:
        text_tokens("hello", 8192)
    assert refused.value.loc == ["body", "text"]
    with pytest.raises(InvalidField, match="Unicode"):
        text_tokens("\ud800", 256)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_session_table_bounds_expiry_versions_and_retries():
    clock = Clock()
    limits = StoreLimits(max_sessions=2, max_total_bytes=100, idle_ttl_s=10, recent_requests=2)
    table = SessionTable(limits, clock)
    first = table.create(b"a" * 10, {}, "m").session_id
    second = table.create(b"b" * 10, {}, "m").session_id
    table.read(first, "m")  # first is now the most recently used
    third = table.create(b"c" * 10, {}, "m").session_id
    with pytest.raises(SessionGone, match="evicted"):
        table.read(second, "m")
    with pytest.raises(SessionNotFound):
        table.read("nope", "m")
    with pytest.raises(SessionGone, match="another model"):
        table.read(first, "other-model")

    # Commits apply only on the version they were computed from.
    done = table.commit(first, "m", 0, b"A" * 20, {"n": 1}, "req-1", b"answer-1")
    assert done == type(done)(1) and table.read(first, "m").version == 1
    late = table.commit(first, "m", 0, b"lost", {}, "req-2", b"answer-2")
    assert late.current is not None and late.current.blob == b"A" * 20 and late.version == 1
    # A retried request (same key) gets its first answer back and changes nothing.
    again = table.commit(first, "m", 0, b"twice", {}, "req-1", b"other")
    assert again.replayed == b"answer-1" and table.read(first, "m").version == 1
    table.commit(first, "m", 1, b"B" * 20, {}, "req-3", b"answer-3")
    table.commit(first, "m", 2, b"C" * 20, {}, "req-4", b"answer-4")
    forgotten = table.commit(first, "m", 3, b"D" * 20, {}, "req-1", b"")
    assert forgotten.replayed is None  # only the last `recent_requests` keys are remembered
    assert table.total_bytes == 30

    with pytest.raises(Unavailable, match="no room"):
        table.create(b"x" * 200, {}, "m")  # larger than the whole store
    clock.now += 11
    with pytest.raises(SessionGone, match="expired"):
        table.read(third, "m")
    assert len(table) == 0 and table.total_bytes == 0


@pytest.mark.parametrize("acting", [False, True])
@pytest.mark.parametrize("kind", list(REGISTRY))
def test_batched_steps_equal_one_at_a_time_and_survive_encoding(kind, acting):
    """Sessions of different histories advance in lockstep with the same answers as alone, with
    the forget threshold off and acting (every memory is chunk invariant at every threshold)."""
    thresholds = REGISTRY[kind].acting_thresholds(1) if acting else (0.0,)
    if not thresholds:
        pytest.skip(f"{kind} has nothing to forget")
    memory = {"kind": kind, "memory_size": 8, "forget_threshold": thresholds[0]}
    config = SequenceModelConfig(vocab_size=64, d_model=32, memory=memory_config(memory))
    model = config.build().eval()
    empty = codec.decode(codec.encode(codec.empty(model)), model)
    assert empty.tokens_seen == 0 and empty.next_logits is None
    states = [empty.state]
    with torch.no_grad():
        for length in (13, 1):
            states.append(model(torch.randint(0, 64, (1, length)))[1])
    chunks = [torch.randint(0, 64, (n,)) for n in (4, 1, 7)]  # lockstep: passes of 3, 2, 1
    batched = run_steps(model, [Step(c, s) for c, s in zip(chunks, states, strict=True)])
    follow = torch.randint(0, 64, (1, 3))
    for chunk, state, result in zip(chunks, states, batched, strict=True):
        with torch.no_grad():
            alone, alone_state = model(chunk[None], state)
            memory = codec.decode(codec.encode(codec.SessionMemory(result.state, None, 0)), model)
            after_alone = model(follow, alone_state)[0]
            after_batched = model(follow, memory.state)[0]
        torch.testing.assert_close(result.logits, alone[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(after_batched, after_alone, rtol=1e-4, atol=1e-5)


# One real Serve application for the rest of the file (module fixture `server`).


@pytest.fixture(scope="module")
def server(ray_local, tmp_path_factory):
    from ray import serve

    from pipelines.train.publish import publish
    from serve.args import DeploymentSettings, Limits, SessionSettings
    from serve.loading import load_served_model
    from serve.local import start_local, stop_local

    folder = tmp_path_factory.mktemp("serve")
    tracking = f"sqlite:///{folder.resolve()}/mlflow.db"
    config = apply_overrides(
        debug("attention"), {"tracking.tracking_uri": tracking, "run.name": "serve-test"}
    )
    published = publish(config, "memlab-serve-test", steps=2)
    args = ServeArgs(
        model_uri=published.champion_uri,
        tracking_uri=tracking,
        api_key=KEY,
        limits=Limits(max_tokens_per_request=512, max_body_bytes=65536, max_new_tokens=64),
        sessions=SessionSettings(max_sessions=24, lock_wait_s=10),
        deployment=DeploymentSettings(
            min_replicas=1,
            max_replicas=1,
            max_ongoing_requests=8,
            max_queued_requests=4,
            replica_cpus=0.5,
        ),
    )
    url = start_local(args, port=free_port(), name=APP)
    reference = load_served_model(published.champion_uri, tracking)
    yield url, published, reference.model, args
    stop_local(APP)
    serve.shutdown()


@pytest.fixture
def client(server):
    with MemlabClient(server[0], api_key=KEY) as memlab:
        yield memlab


def _next_probs(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits, _ = model(torch.tensor([tokens]))
    return logits[0, -1].softmax(-1)


def _close(top, probs: torch.Tensor) -> bool:
    expected = probs[torch.tensor(top.tokens)]
    return torch.allclose(torch.tensor(top.probs), expected, rtol=1e-3, atol=1e-5)


@pytest.mark.ray
@pytest.mark.timeout(600)  # includes publishing the model and starting Serve (module fixture)
def test_model_card_names_what_is_served(server, client):
    _, published, model, _ = server
    card = client.model_card()
    assert card.mechanism == "attention" and card.task == "mqar"
    assert card.run_id == published.run_id
    assert (card.registered_model, card.version) == ("memlab-serve-test", published.version)
    assert card.metrics["val_loss"] == pytest.approx(published.metrics["val_loss"])
    assert card.parameters == model.num_parameters()
    assert card.config["model"]["memory"]["memory_size"] == 16
    assert card.text_input
    assert client.health().status == "ok"


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_api_key_is_enforced_and_never_logged(server):
    import ray

    url = server[0]
    guarded = [
        ("GET", "/v1/model"),
        ("POST", "/v1/predict"),
        ("POST", "/v1/sessions"),
        ("GET", "/v1/sessions/abc"),
        ("POST", "/v1/sessions/abc/append"),
        ("POST", "/v1/sessions/abc/generate"),
        ("DELETE", "/v1/sessions/abc"),
        ("GET", "/docs"),
        ("GET", "/openapi.json"),
    ]
    for method, path in guarded:
        for headers in ({}, {"X-API-Key": "wrong"}, {"X-API-Key": KEY.upper()}):
            answer = httpx.request(method, url + path, headers=headers, json={})
            assert answer.status_code == 401, (method, path, headers, answer.text)
    assert httpx.get(url + "/healthz").status_code == 200
    keyed = {"X-API-Key": KEY}
    assert httpx.get(url + "/docs", headers=keyed).status_code == 200
    paths = httpx.get(url + "/openapi.json", headers=keyed).json()["paths"]
    assert "/v1/sessions/{session_id}/append" in paths
    assert httpx.get(url + "/v1/model", headers={"X-API-Key": KEY}).status_code == 200
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    leaked = [p.name for p in logs.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]
    assert not leaked


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_predict_is_the_model_from_empty_memory(server, client):
    model = server[2]
    sequences = [[5, 200, 7, 9, 11], [3, 4]]
    answer = client.predict(sequences, top_k=4, positions=[[1, -1], [-1]])
    first, second = answer.results
    assert [p.position for p in first.predictions] == [1, 4]
    assert _close(first.predictions[1].top, _next_probs(model, sequences[0]))
    assert _close(first.predictions[0].top, _next_probs(model, sequences[0][:2]))
    assert _close(second.predictions[0].top, _next_probs(model, sequences[1]))


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_session_memory_is_real(server, client):
    """An answer depends on what earlier requests appended, and is gone with the session."""
    model = server[2]
    context, more, query = [10, 140, 20, 150, 30, 160], [40, 170, 50], [20]
    session = client.create_session().session_id
    client.append(session, tokens=context)
    client.append(session, tokens=more)
    answer = client.append(session, tokens=query, top_k=8)
    history = context + more + query
    assert answer.tokens_seen == len(history)
    assert _close(answer.next, _next_probs(model, history))
    assert not _close(answer.next, _next_probs(model, query))
    info = client.inspect(session)
    assert info.tokens_seen == len(history) and info.version == 3
    assert info.live_slots == [len(history)] * 2 and info.state_bytes > 0

    greedy = client.generate(session, max_new_tokens=3, advance=False)
    expected = history[:]
    for _ in range(3):
        expected.append(int(_next_probs(model, expected).argmax()))
    assert greedy.tokens == expected[len(history) :]
    assert client.inspect(session).tokens_seen == len(history)  # advance=False kept it

    client.delete(session)
    with pytest.raises(MemlabHTTPError) as gone:
        client.append(session, tokens=query)
    assert gone.value.status == 404
    fresh = client.create_session().session_id
    alone = client.append(fresh, tokens=query, top_k=8)
    assert _close(alone.next, _next_probs(model, query))
    assert not _close(alone.next, _next_probs(model, history))


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_text_appends_bytes_and_generates_text(client):
    session = client.create_session().session_id
    appended = client.append(session, text="héllo")
    assert appended.appended == len("héllo".encode())
    generated = client.generate(session, max_new_tokens=4, temperature=0.8, top_k=20, seed=3)
    assert generated.text is not None and generated.tokens_seen == appended.tokens_seen + 4
    with pytest.raises(MemlabHTTPError) as empty:
        client.generate(client.create_session().session_id)
    assert empty.value.status == 409


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_concurrent_appends_to_one_session_are_serialised(server, client):
    model = server[2]
    session = client.create_session().session_id
    client.append(session, tokens=[1])
    tokens = [30, 31, 32, 33, 34, 35]

    def append(token: int):
        try:
            return token, client.append(session, tokens=[token])
        except MemlabHTTPError as refused:
            assert refused.status == 409 and refused.retry_after is not None
            return token, None

    with ThreadPoolExecutor(len(tokens)) as pool:
        outcomes = list(pool.map(append, tokens))
    done = sorted((r.tokens_seen, t) for t, r in outcomes if r is not None)
    assert len(done) >= 1
    # Each accepted append saw every earlier one: no two read the same state.
    assert [seen for seen, _ in done] == list(range(2, 2 + len(done)))
    final = client.inspect(session)
    assert final.tokens_seen == 1 + len(done)
    history = [1] + [token for _, token in done]
    last = client.generate(session, max_new_tokens=1, advance=False)
    assert last.tokens == [int(_next_probs(model, history).argmax())]


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_limits_and_mistakes_get_4xx_that_name_the_problem(server, client):
    url = server[0]
    headers = {"X-API-Key": KEY}
    session = client.create_session().session_id
    append = f"{url}/v1/sessions/{session}/append"

    too_many = httpx.post(append, json={"tokens": [1] * 513}, headers=headers)
    assert too_many.status_code == 413 and "512" in too_many.json()["detail"]
    huge = httpx.post(append, content=b"[" + b"1," * 40000 + b"1]", headers=headers)
    assert huge.status_code == 413
    outside = httpx.post(append, json={"tokens": [1, 256]}, headers=headers)
    assert outside.status_code == 422
    assert outside.json()["detail"][0]["loc"] == ["body", "tokens", 1]
    typo = httpx.post(append, json={"tokens": [1], "topk": 3}, headers=headers)
    assert typo.status_code == 422 and typo.json()["detail"][0]["loc"] == ["body", "topk"]
    both = httpx.post(append, json={"tokens": [1], "text": "a"}, headers=headers)
    assert both.status_code == 422 and "exactly one" in both.json()["detail"][0]["msg"]
    broken = httpx.post(append, content=b"{not json", headers=headers)
    assert broken.status_code == 400 and broken.json()["detail"][0]["type"] == "json_invalid"
    boolean = httpx.post(append, json={"tokens": [1, True]}, headers=headers)
    assert boolean.status_code == 422
    assert boolean.json()["detail"][0]["loc"] == ["body", "tokens", 1]
    long_gen = httpx.post(
        f"{url}/v1/sessions/{session}/generate", json={"max_new_tokens": 65}, headers=headers
    )
    assert long_gen.status_code == 422 and long_gen.json()["detail"][0]["loc"][-1] == (
        "max_new_tokens"
    )
    assert httpx.get(f"{url}/v1/sessions/{'f' * 32}", headers=headers).status_code == 404


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_the_least_recently_used_session_is_evicted_with_410(client):
    first = client.create_session().session_id
    for _ in range(24):  # the store holds 24
        client.create_session()
    with pytest.raises(MemlabHTTPError) as gone:
        client.inspect(first)
    assert gone.value.status == 410 and "evicted" in gone.value.detail


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_session_survives_its_replica_being_killed(server, client):
    import ray

    model = server[2]
    session = client.create_session().session_id
    client.append(session, tokens=[7, 8, 9, 10])
    killed = client.health().replica
    (name,) = [n for n in _replica_actors() if n.endswith(killed)]
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    deadline = time.monotonic() + 240
    replaced = None
    while replaced is None and time.monotonic() < deadline:
        time.sleep(0.5)
        try:
            answered = httpx.get(server[0] + "/healthz", timeout=5).json()
        except (httpx.HTTPError, ValueError):
            continue
        replaced = answered.get("replica") if answered.get("replica") != killed else None
    assert replaced, "Serve did not replace the killed replica"
    answer = client.append(session, tokens=[11], top_k=8)
    assert answer.tokens_seen == 5
    assert _close(answer.next, _next_probs(model, [7, 8, 9, 10, 11]))
    assert client.health().replica == replaced


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_a_retried_update_is_applied_once(server, client):
    session = client.create_session().session_id
    first = client.append(session, tokens=[5, 6], request_id="append-1")
    assert client.append(session, tokens=[5, 6], request_id="append-1") == first
    assert client.inspect(session).tokens_seen == 2
    assert client.append(session, tokens=[7], request_id="append-2").tokens_seen == 3
    headers = {"X-API-Key": KEY, "Idempotency-Key": "append-2"}
    raw = httpx.post(
        f"{server[0]}/v1/sessions/{session}/append", json={"tokens": [7]}, headers=headers
    )
    assert raw.status_code == 200 and raw.json()["tokens_seen"] == 3
    generated = client.generate(session, max_new_tokens=2, request_id="generate-1")
    assert client.generate(session, max_new_tokens=2, request_id="generate-1") == generated
    assert client.inspect(session).tokens_seen == 5


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_requests_in_flight_on_a_dying_replica_get_a_json_503(server, client):
    """No plain-text 500, and nothing left holding the session: it answers at once afterwards."""
    url, headers = server[0], {"X-API-Key": KEY}
    session = client.create_session().session_id
    client.append(session, tokens=[3, 4])
    busy = [client.create_session().session_id for _ in range(6)]
    for other in busy:
        client.append(other, tokens=[1])

    def generate(session_id: str) -> httpx.Response:
        body = {"max_new_tokens": 64, "advance": True}
        path = f"{url}/v1/sessions/{session_id}/generate"
        return httpx.post(path, json=body, headers=headers, timeout=60)

    with ThreadPoolExecutor(len(busy)) as pool:
        answers = [pool.submit(generate, other) for other in busy]
        time.sleep(0.3)
        killed = _kill_model_replica()
        answers = [future.result() for future in answers]
    for answer in answers:
        assert answer.status_code in (200, 503), (answer.status_code, answer.text[:300])
        assert answer.headers["content-type"] == "application/json", answer.text[:300]
        if answer.status_code == 503:  # the replica stopped, or the survivors are at capacity
            assert answer.headers["retry-after"] and answer.json()["detail"]
    _wait_for_a_new_replica(url, killed)
    with MemlabClient(url, api_key=KEY, retries=0) as once:
        assert once.append(session, tokens=[5]).tokens_seen == 3  # first try: no stale lock


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_openapi_describes_the_api_that_runs(server):
    url, headers = server[0], {"X-API-Key": KEY}
    document = httpx.get(f"{url}/openapi.json", headers=headers).json()
    schemes = document["components"]["securitySchemes"]
    assert {s.get("name", s.get("scheme")) for s in schemes.values()} == {"X-API-Key", "bearer"}
    paths = document["paths"]
    assert "security" not in paths["/healthz"]["get"]
    append = paths["/v1/sessions/{session_id}/append"]["post"]
    assert append["security"] and {"400", "413", "422", "503"} <= set(append["responses"])
    idempotency = {p["name"]: p for p in append["parameters"]}["Idempotency-Key"]
    assert idempotency["in"] == "header"
    bodies = document["components"]["schemas"]
    tokens = bodies["AppendRequest"]["properties"]["tokens"]["anyOf"][0]
    assert tokens["items"] == {"type": "integer", "minimum": 0, "exclusiveMaximum": 256}
    assert tokens["maxItems"] == 512  # the application's limit (beyond it: 413)
    assert bodies["AppendRequest"]["oneOf"] == [{"required": ["tokens"]}, {"required": ["text"]}]
    assert bodies["AppendRequest"]["properties"]["top_k"]["maximum"] == 50
    assert bodies["GenerateRequest"]["properties"]["max_new_tokens"]["maximum"] == 64
    assert httpx.get(f"{url}/healthz").status_code == 200  # never 401


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_sessions_live_and_die_with_their_application(server):
    """A redeployment with another key starts an empty store; deleting the application leaves
    no store behind; without a key the docs are open and ask for none."""
    from serve.local import start_local, stop_local

    url, port, args = server[0], int(server[0].rsplit(":", 1)[1]), server[3]
    name, prefix = f"{APP}-scope", "/scope"
    first = start_local(args, port=port, name=name, route_prefix=prefix)
    with MemlabClient(first, api_key=KEY) as client:
        session = client.create_session().session_id
        client.append(session, tokens=[1, 2])
    keyless = args.model_copy(update={"api_key": None})
    second = start_local(keyless, port=port, name=name, route_prefix=prefix)
    with MemlabClient(second) as client:
        with pytest.raises(MemlabHTTPError) as gone:
            client.inspect(session)
        assert gone.value.status == 404
    document = httpx.get(f"{second}/openapi.json").json()
    assert "securitySchemes" not in document.get("components", {})
    assert httpx.get(f"{second}/docs").status_code == 200
    stop_local(name)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and _replica_actors(name):
        time.sleep(0.5)
    assert not _replica_actors(name), "the application's deployments outlived it"
    assert httpx.get(f"{url}/healthz").status_code == 200  # the other application is untouched


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_appends_survive_replica_kills_exactly_once(server):
    """8 sessions append concurrently while the model replica is killed every few seconds: every
    session holds exactly the tokens acknowledged to it (retries carry the same key)."""
    url, stop = server[0], threading.Event()
    acknowledged, first_try, attempts = [0] * 8, [0] * 8, [0] * 8

    def appender(index: int) -> str:
        with MemlabClient(url, api_key=KEY, retries=1) as client:
            session = client.create_session().session_id
            while not stop.is_set():
                key = f"{session}-{acknowledged[index]}"
                attempts[index] += 1
                try:
                    client.append(session, tokens=[index + 1], request_id=key)
                    first_try[index] += 1
                except (MemlabHTTPError, httpx.HTTPError):
                    _append_until_answered(client, session, [index + 1], key)
                acknowledged[index] += 1
            return session

    with ThreadPoolExecutor(8) as pool:
        sessions = [pool.submit(appender, index) for index in range(8)]
        for _ in range(3):
            time.sleep(6)
            killed = _kill_model_replica()
            _wait_for_a_new_replica(url, killed)
        time.sleep(3)
        stop.set()
        sessions = [future.result() for future in sessions]
    with MemlabClient(url, api_key=KEY) as client:
        for index, session in enumerate(sessions):
            assert client.inspect(session).tokens_seen == acknowledged[index], index
    rate = sum(first_try) / sum(attempts)
    print(f"appends {sum(acknowledged)}, answered with at most one retry: {rate:.1%}")
    assert sum(acknowledged) > 8 * 3


def _append_until_answered(client, session: str, tokens: list[int], key: str) -> None:
    """What a careful client does when a retry also failed: ask again with the same key until
    the server answers; the update is applied at most once whatever happened before."""
    deadline = time.monotonic() + 120
    while True:
        try:
            client.append(session, tokens=tokens, request_id=key)
            return
        except (MemlabHTTPError, httpx.HTTPError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _kill_model_replica() -> str:
    import ray

    (name,) = [n for n in _replica_actors() if "#MemlabModel#" in n]
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    return name.rsplit("#", 1)[-1]


def _wait_for_a_new_replica(url: str, killed: str) -> str:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        try:
            answered = httpx.get(url + "/healthz", timeout=5).json().get("replica")
        except (httpx.HTTPError, ValueError):
            answered = None
        if answered and answered != killed:
            return answered
        time.sleep(0.5)
    raise AssertionError("Serve did not replace the killed replica")


def _replica_actors(app: str = APP) -> list[str]:
    import ray

    prefix = f"SERVE_REPLICA::{app}#"
    return [
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith(prefix)
    ]


# Fuzzing: nothing a client can send gets a 5xx.


def _weighted(choices: list[tuple[st.SearchStrategy, int]]) -> st.SearchStrategy:
    # `one_of` draws its branches evenly (and merges repeated ones): weights need a draw first.
    slots = [strategy for strategy, weight in choices for _ in range(weight)]
    return st.sampled_from(range(len(slots))).flatmap(slots.__getitem__)


JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=12,
)
VALID_TOKENS = st.lists(st.integers(0, 255), min_size=1, max_size=12)
ANY_TOKENS = st.lists(st.integers(-3, 260) | st.integers(), max_size=12)
TOKENS = _weighted([(VALID_TOKENS, 3), (ANY_TOKENS, 1)])
TEXT = st.text(st.characters(exclude_categories=()), max_size=12)  # lone surrogates too


def _maybe(values: st.SearchStrategy) -> st.SearchStrategy:
    return st.none() | values | JSON_VALUE


def _body(
    required: dict[str, st.SearchStrategy] | None = None, **optional: st.SearchStrategy
) -> st.SearchStrategy:
    """Mostly objects of the right shape (values in and out of range), some with wrong types, a
    missing or an unknown field, some any JSON at all."""
    required = required or {}
    typed = st.fixed_dictionaries(required, optional=optional)
    perturbed = {name: _maybe(value) for name, value in (required | optional).items()}
    untyped = st.fixed_dictionaries({}, optional=perturbed | {"extra": JSON_VALUE})
    return _weighted([(typed, 3), (untyped, 1), (JSON_VALUE, 1)])


def _post(http: httpx.Client, path: str, body: object) -> httpx.Response:
    # Our own encoding: httpx's refuses NaN and cannot encode lone surrogates, both of which a
    # client can send as valid JSON text ("NaN" is accepted by Python's parser, "\ud800" is JSON).
    content = json.dumps(body).encode()
    return http.post(path, content=content, headers={"Content-Type": "application/json"})


def _no_5xx(answer: httpx.Response) -> None:
    event(f"HTTP {answer.status_code}")  # --hypothesis-show-statistics shows the spread
    assert answer.status_code < 500, (answer.request.url, answer.status_code, answer.text[:500])


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server[0], headers={"X-API-Key": KEY}, timeout=60) as session:
        yield session


@pytest.fixture
def anonymous(server):
    with httpx.Client(base_url=server[0], timeout=60) as session:
        yield session


@pytest.fixture
def fuzz_session(http):
    created = http.post("/v1/sessions")
    assert created.status_code == 201
    http.post(f"/v1/sessions/{created.json()['session_id']}/append", json={"tokens": [1, 2]})
    return created.json()["session_id"]


@pytest.mark.ray
@pytest.mark.timeout(300)
@FUZZ
@given(
    body=_body(
        {"sequences": st.lists(TOKENS, min_size=1, max_size=4)},
        top_k=st.integers(-2, 60) | st.integers(),
        positions=st.lists(st.lists(st.integers(-3, 3) | st.integers(), max_size=3), max_size=4),
    )
)
def test_fuzz_predict(http, body):
    _no_5xx(_post(http, "/v1/predict", body))


@pytest.mark.ray
@pytest.mark.timeout(300)
@FUZZ
@given(
    body=_weighted(
        [
            (_body({"tokens": TOKENS}, top_k=st.integers(-2, 60) | st.integers()), 1),
            (_body({"text": TEXT}, top_k=st.integers(-2, 60) | st.integers()), 1),
            (_body(tokens=TOKENS, text=TEXT), 1),
        ]
    )
)
def test_fuzz_append(http, fuzz_session, body):
    _no_5xx(_post(http, f"/v1/sessions/{fuzz_session}/append", body))


@pytest.mark.ray
@pytest.mark.timeout(300)
@FUZZ
@given(
    body=_body(
        max_new_tokens=st.integers(-1, 70) | st.integers(),
        temperature=st.floats() | st.sampled_from([0.0, 1e-300, 1e-3, 1.0, 100.0]),
        top_k=st.integers(-1, 300) | st.integers(),
        seed=st.integers(),
        advance=st.booleans(),
    )
)
def test_fuzz_generate(http, fuzz_session, body):
    if isinstance(body, dict) and isinstance(body.get("max_new_tokens"), int):
        body["max_new_tokens"] = min(body["max_new_tokens"], 8)  # keep the run short
    _no_5xx(_post(http, f"/v1/sessions/{fuzz_session}/generate", body))


@pytest.mark.ray
@pytest.mark.timeout(300)
@FUZZ
@given(
    session_id=st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=80),
    method=st.sampled_from(["GET", "DELETE", "POST"]),
    suffix=st.sampled_from(["", "/append", "/generate", "/other"]),
)
def test_fuzz_session_ids_and_methods(http, session_id, method, suffix):
    path = f"/v1/sessions/{quote(session_id, safe='')}{suffix}"
    _no_5xx(http.request(method, path, json={"tokens": [1]}))


@pytest.mark.ray
@pytest.mark.timeout(300)
@FUZZ
@given(
    path=st.sampled_from(
        ["/v1/predict", "/v1/sessions", "/v1/model", "/healthz", "/v1/sessions/x/append"]
    ),
    method=st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE"]),
    raw=st.binary(max_size=64),
    key=st.sampled_from([KEY, None, "", "x" * 200]),
)
def test_fuzz_raw_bodies_and_keys(anonymous, path, method, raw, key):
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["X-API-Key"] = key
    _no_5xx(anonymous.request(method, path, content=raw, headers=headers))


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_overload_is_refused_fast_with_503(server, fuzz_session):
    """8 running and 4 queued at most: the rest are turned away at once, not queued."""
    body = {"max_new_tokens": 64, "advance": False}

    path = f"/v1/sessions/{fuzz_session}/generate"
    limits = httpx.Limits(max_connections=32)
    headers = {"X-API-Key": KEY}
    with httpx.Client(base_url=server[0], headers=headers, limits=limits, timeout=60) as http:
        http.get("/healthz")

        def generate(_: int) -> tuple[int, float]:
            started = time.perf_counter()
            answer = http.post(path, json=body)
            return answer.status_code, time.perf_counter() - started

        with ThreadPoolExecutor(32) as pool:
            outcomes = list(pool.map(generate, range(32)))
    codes = [code for code, _ in outcomes]
    assert set(codes) <= {200, 503}, codes
    refused = sorted(seconds for code, seconds in outcomes if code == 503)
    served = sorted(seconds for code, seconds in outcomes if code == 200)
    assert refused, "no request was refused"
    assert served, "no request was served"
    # Refusals come at once, not after waiting in a queue: well before a served request ends.
    # (Relative, since this machine is shared; alone, refusals take a few milliseconds.)
    median_refusal = refused[len(refused) // 2]
    assert median_refusal < min(2.0, served[len(served) // 2] / 2), (refused, served)


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_sigterm_stops_memlab_serve_and_everything_it_started(tmp_path):
    """A service manager or a script's cleanup stops `memlab serve` with SIGTERM: it exits like
    after Ctrl-C, and no Ray process it started is left running (or listening)."""
    import os
    import signal
    import subprocess
    import sys

    from pipelines.checkpoint import Position, save_checkpoint

    config = debug("attention")
    model = config.model.build()
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    save_checkpoint(tmp_path / "model", model, optimizer, scheduler, Position(), config)
    port = free_port()
    command = [
        sys.executable, "-m", "pipelines.cli", "serve", "--model-uri", str(tmp_path / "model"),
        "--port", str(port), "--ray-address", "local", "--max-replicas", "1",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MEMLAB_"))}
    process = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    try:
        _wait_until_serving(f"http://127.0.0.1:{port}", process)
        started = _descendants(process.pid)
        assert started, "memlab serve started no Ray processes?"
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=180)[0]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, output[-3000:]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(_alive(pid) for pid in started):
        time.sleep(1)
    left = [pid for pid in started if _alive(pid)]
    assert not left, f"still running after SIGTERM: {[_command_line(pid) for pid in left]}"
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)


def _wait_until_serving(url: str, process) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"memlab serve exited early:\n{process.stdout.read()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        time.sleep(1)
    raise AssertionError("memlab serve never answered /healthz")


def _descendants(root: int) -> set[int]:
    """Every process whose chain of parents leads to `root` (read from /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _command_line(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
    return "?"


# The OpenAI-compatible API, through the real `openai` client.


@pytest.fixture
def openai_client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0)


def _greedy(model, tokens: list[int], count: int) -> list[int]:
    """The model's greedy continuation of `tokens`, `count` tokens long."""
    tokens = list(tokens)
    for _ in range(count):
        tokens.append(int(_next_probs(model, tokens).argmax()))
    return tokens[-count:]


def _greedy_text(model, prompt: str, count: int) -> str:
    return bytes(_greedy(model, list(prompt.encode()), count)).decode("utf-8", errors="replace")


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_openai_completions_blocking_and_streamed(server, openai_client):
    model, name = server[2], "memlab-serve-test"
    assert [m.id for m in openai_client.models.list().data] == [name]
    done = openai_client.completions.create(model=name, prompt="ab", max_tokens=5, temperature=0)
    (choice,) = done.choices
    assert choice.text == _greedy_text(model, "ab", 5) and choice.finish_reason == "length"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (2, 5)
    stream = openai_client.completions.create(
        model=name, prompt="ab", max_tokens=5, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert chunks[-1].usage.total_tokens == 7
    several = openai_client.completions.create(
        model=name, prompt=["a", "b"], max_tokens=3, n=2, temperature=1.0, top_p=0.9, seed=5
    )
    assert sorted(c.index for c in several.choices) == [0, 1, 2, 3]
    assert several.usage.completion_tokens == 12


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_openai_chat_with_stop_strings_and_a_memory_session(server, openai_client, client):
    name = "memlab-serve-test"
    messages = [{"role": "user", "content": "hi"}]
    reply = openai_client.chat.completions.create(
        model=name, messages=messages, max_tokens=6, temperature=0
    )
    text = reply.choices[0].message.content
    assert reply.choices[0].message.role == "assistant" and reply.usage.completion_tokens <= 6
    assert text == _greedy_text(server[2], "user: hi\nassistant: ", 6)[: len(text)]
    streamed = openai_client.chat.completions.create(
        model=name, messages=messages, max_tokens=6, temperature=0, stream=True
    )
    parts = [c.choices[0].delta.content or "" for c in streamed if c.choices]
    assert "".join(parts) == text
    if text:  # the first character as a stop string: the reply ends before it
        stopped = openai_client.chat.completions.create(
            model=name, messages=messages, max_tokens=6, temperature=0, stop=[text[0]]
        )
        assert (
            stopped.choices[0].message.content == "" and stopped.choices[0].finish_reason == "stop"
        )

    session = client.create_session().session_id
    first = openai_client.completions.create(
        model=name, prompt="abc", max_tokens=4, temperature=0, extra_body={"session_id": session}
    )
    assert client.inspect(session).tokens_seen == 3 + first.usage.completion_tokens
    more = openai_client.completions.create(
        model=name, prompt="d", max_tokens=2, temperature=0, extra_body={"session_id": session}
    )
    history = [*b"abc", *_greedy(server[2], list(b"abc"), 4), *b"d"]  # what the memory read
    expected = bytes(_greedy(server[2], history, 2)).decode("utf-8", errors="replace")
    assert more.choices[0].text == expected


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_openai_refusals_are_clear_4xx(server, openai_client):
    openai = pytest.importorskip("openai")
    name = "memlab-serve-test"
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        openai_client.completions.create(model=name, prompt="a", logprobs=2)
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        openai_client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "a"}], presence_penalty=0.5
        )
    with pytest.raises(openai.NotFoundError, match="not served here"):
        openai_client.completions.create(model="gpt-4o", prompt="a")
    with pytest.raises(openai.UnprocessableEntityError):
        openai_client.completions.create(model=name, prompt="a", max_tokens=65)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server[0]}/v1", api_key="x", max_retries=0).models.list()


# Encoder-decoder sessions: encode a context once, ask many times.


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_a_session_encodes_a_context_once_and_answers_from_it(server, tmp_path):
    """Two sessions with different contexts answer the same query differently, each exactly as
    the model does with that context's memory; a session without one reads an empty memory."""
    from pipelines.recipes import debug_encdec
    from pipelines.train.publish import publish
    from serve.loading import load_served_model
    from serve.local import start_local, stop_local

    tracking = f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    config = apply_overrides(
        debug_encdec(), {"tracking.tracking_uri": tracking, "run.name": "serve-encdec"}
    )
    published = publish(config, "memlab-serve-encdec", steps=2)
    args = server[3].model_copy(
        update={"model_uri": published.champion_uri, "tracking_uri": tracking}
    )
    port, name = int(server[0].rsplit(":", 1)[1]), f"{APP}-encdec"
    url = start_local(args, port=port, name=name, route_prefix="/encdec")
    model = load_served_model(published.champion_uri, tracking).model
    contexts, query = ([10, 200, 11, 201], [12, 202, 13, 203]), [10, 11, 12]
    try:
        with MemlabClient(url, api_key=KEY) as client:
            answers = []
            for context in contexts:
                session = client.create_session().session_id
                encoded = client.encode(session, tokens=context)
                assert encoded.context_tokens == 4 and encoded.slots > 0
                assert client.inspect(session).live_slots[0] == encoded.slots
                answers.append(client.append(session, tokens=query, top_k=4))
                again = client.append(session, tokens=query, top_k=4)  # the memory is kept
                with torch.no_grad():
                    state = model.init_state(1).with_memory(model.encode(torch.tensor([context])))
                    first, state = model(torch.tensor([query]), state)
                    second, _ = model(torch.tensor([query]), state)
                assert _close(answers[-1].next, first[0, -1].softmax(-1))
                assert _close(again.next, second[0, -1].softmax(-1))
            assert answers[0].next.probs != answers[1].next.probs
            bare = client.append(client.create_session().session_id, tokens=query, top_k=4)
            with torch.no_grad():
                alone = model(torch.tensor([query]))[0][0, -1].softmax(-1)
            assert _close(bare.next, alone)
        with MemlabClient(server[0], api_key=KEY) as decoder_only:
            session = decoder_only.create_session().session_id
            with pytest.raises(MemlabHTTPError, match="no encoder") as refused:
                decoder_only.encode(session, tokens=[1, 2])
            assert refused.value.status == 400
    finally:
        stop_local(name)
