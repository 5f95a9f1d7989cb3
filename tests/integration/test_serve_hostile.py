"""The served API under hostile and careless clients, over real HTTP on real Ray Serve: no
body makes a 500 (fuzzed from the API's own OpenAPI schema), oversized bodies are refused
before they are parsed, a huge prompt is tokenized off the event loop, and requests whose
clients left stop generating and free the replica."""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Iterator

import openai
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ray import serve

from tests.helpers import free_port, tiny_config
from trainer.coordinator import run_training
from trainer.serve.app import start_serving
from trainer.serve.openai_api import MAX_BODY_BYTES
from trainer.serve.options import ServeOptions

pytestmark = pytest.mark.integration
PROMPT = "The state of the Union is"
MAX_TOKENS = 100  # the server's cap; the tiny model's context is 128 tokens


@pytest.fixture(scope="module")
def url(ray_cluster, demo_root, notes_site, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("hostile") / "run"
    run_training(tiny_config(demo_root, notes_site, run_dir, rounds=1,
                             **{"model.tokenizer": "smollm2"}))
    options = ServeOptions(run_dir=str(run_dir), port=free_port(), num_cpus=0, poll_s=0.2,
                           max_tokens=MAX_TOKENS)
    yield start_serving(options, app_name="hostile", route_prefix="/hostile")
    serve.shutdown()


def post(url: str, body, *, route: str = "completions", timeout: float = 60,
         **kwargs) -> requests.Response:
    data = body if isinstance(body, (bytes, str, Iterator)) else json.dumps(body)
    return requests.post(f"{url}/v1/{route}", data=data, timeout=timeout,
                         headers={"Content-Type": "application/json"}, **kwargs)


def test_values_at_the_edges_are_answered_or_refused_by_name(url):
    model = "run"
    greedy = post(url, {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0})
    assert greedy.status_code == 200, greedy.text
    near_zero = post(url, {"model": model, "prompt": PROMPT, "max_tokens": 8,
                           "temperature": 1e-40})  # overflowed logits / temperature before
    assert near_zero.status_code == 200, near_zero.text
    assert near_zero.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]
    for seed in (2**64 - 1, -(2**63)):
        answered = post(url, {"model": model, "prompt": PROMPT, "max_tokens": 4, "seed": seed})
        assert answered.status_code == 200, answered.text
    too_big = post(url, {"model": model, "prompt": PROMPT, "seed": 2**70})
    assert too_big.status_code == 400 and too_big.json()["error"]["param"] == "seed"
    digits = post(url, '{"model": "run", "prompt": "a", "seed": ' + "7" * 5000 + "}")
    assert digits.status_code == 400 and "not valid JSON" in digits.json()["error"]["message"]
    nested = post(url, '{"model": "run", "prompt": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert nested.status_code == 400, nested.text


def test_a_body_over_the_limit_is_refused_before_it_is_parsed(url):
    body = json.dumps({"model": "run", "prompt": "word " * (MAX_BODY_BYTES // 5 + 10)})
    declared = post(url, body)
    assert declared.status_code == 413 and declared.json()["error"]["code"] == "body_too_large"
    chunked = post(url, (body[i:i + 65536].encode() for i in range(0, len(body), 65536)))
    assert chunked.status_code == 413  # no Content-Length: counted as it arrives


def test_a_huge_prompt_is_tokenized_while_other_requests_are_answered(url):
    from trainer.model_source import load_tokenizer

    text = "The quick brown fox jumps over the lazy dog. " * (MAX_BODY_BYTES // 48)
    tokenizer = load_tokenizer("smollm2")
    started = time.perf_counter()
    tokenizer(text, add_special_tokens=False)
    tokenize_s = time.perf_counter() - started
    outcome = {}

    def huge() -> None:
        outcome["response"] = post(url, {"model": "run", "prompt": text, "max_tokens": 1})

    thread = threading.Thread(target=huge)
    thread.start()
    latencies = []
    while thread.is_alive():
        asked = time.perf_counter()
        requests.get(f"{url}/health", timeout=60).raise_for_status()
        latencies.append(time.perf_counter() - asked)
        time.sleep(0.02)
    thread.join()
    response = outcome["response"]
    assert response.status_code == 400 and response.json()["error"]["code"] == \
        "context_length_exceeded"
    # Blocked behind the tokenizer, /health would wait about as long as it takes.
    assert max(latencies) < tokenize_s / 2, (max(latencies), tokenize_s, len(latencies))


def inlined(schema, components: dict):
    """The schema with every #/components/schemas/ reference replaced by what it names."""
    if isinstance(schema, dict):
        if "$ref" in schema:
            return inlined(components[schema["$ref"].rsplit("/", 1)[-1]], components)
        return {k: inlined(v, components) for k, v in schema.items()}
    if isinstance(schema, list):
        return [inlined(v, components) for v in schema]
    return schema


def from_schema(schema: dict) -> st.SearchStrategy:
    """Values valid under `schema`: the JSON Schema the API's pydantic models produce (types,
    bounds, anyOf, arrays, objects with required and optional properties, Literal enums)."""
    if "anyOf" in schema:
        return st.one_of([from_schema(option) for option in schema["anyOf"]])
    if "enum" in schema or "const" in schema:
        return st.sampled_from(schema.get("enum") or [schema["const"]])
    kind = schema.get("type")
    if kind == "object":
        return _object(schema)
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {})),
                        min_size=schema.get("minItems", 0), max_size=3)
    if kind == "integer":
        return st.integers(schema.get("minimum"), schema.get("maximum"))
    if kind == "number":
        low = schema.get("minimum", schema.get("exclusiveMinimum"))
        return st.floats(low, schema.get("maximum"), exclude_min="exclusiveMinimum" in schema,
                         allow_nan=False)
    simple = {"string": st.text(max_size=40), "boolean": st.booleans(), "null": st.none()}
    return simple.get(kind, JSON)


def _object(schema: dict) -> st.SearchStrategy:
    properties = schema.get("properties")
    if properties is None:  # a mapping of one value type
        return st.dictionaries(st.text(max_size=8), from_schema(
            schema.get("additionalProperties") or {}), max_size=3)
    required = set(schema.get("required", ()))
    return st.fixed_dictionaries(
        {k: from_schema(v) for k, v in properties.items() if k in required},
        optional={k: from_schema(v) for k, v in properties.items() if k not in required})


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)


@pytest.mark.parametrize("route", ["completions", "chat/completions"])
def test_no_body_makes_a_server_error(url, route):
    """Bodies drawn from /openapi.json's own schema of the route, and the same fields with
    any JSON values: every answer is a 200 or a 4xx."""
    spec = requests.get(f"{url}/openapi.json", timeout=30).json()
    components = spec["components"]["schemas"]
    path = next(p for p in spec["paths"] if p.endswith(f"/v1/{route}"))
    body = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    schema = inlined(body, components)
    # The schema says `model` is a string; the served names are what get past the 404.
    served = [m["id"] for m in requests.get(f"{url}/v1/models", timeout=30).json()["data"]]
    schema["properties"]["model"] = {"enum": [*served, "elsewhere"]}
    fields = sorted(schema["properties"])
    loose = st.dictionaries(st.sampled_from(fields), JSON, max_size=len(fields))
    seen = []

    @settings(max_examples=60, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.one_of(from_schema(schema), loose))
    def check(payload: dict) -> None:
        answered = post(url, payload, route=route)
        seen.append((answered.status_code, answered.text[:150]))
        assert answered.status_code < 500, (payload, answered.text)

    check()
    codes = {code for code, _ in seen}
    assert 200 in codes and any(400 <= code < 500 for code in codes), seen[:20]


def test_requests_whose_clients_left_stop_generating(url):
    """32 clients that give up on a long answer, then one that waits for a short one: the
    replica is free again within a token or two of each, not after all their tokens."""
    api = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)

    def ask(max_tokens: int) -> float:
        started = time.perf_counter()
        api.completions.create(model="run", prompt=PROMPT, max_tokens=max_tokens,
                               temperature=0)
        return time.perf_counter() - started

    long_s = statistics.median(ask(MAX_TOKENS) for _ in range(3))
    short_s = statistics.median(ask(16) for _ in range(3))

    def give_up(stream: bool) -> None:
        try:
            post(url, {"model": "run", "prompt": PROMPT, "max_tokens": MAX_TOKENS,
                       "stream": stream}, timeout=1.0)  # long enough to reach the replica
        except requests.exceptions.Timeout:
            pass

    droppers = [threading.Thread(target=give_up, args=(i % 2 == 0,)) for i in range(32)]
    for thread in droppers:
        thread.start()
    for thread in droppers:
        thread.join()
    after_s = ask(16)
    print(f"a 16-token answer after 32 dropped {MAX_TOKENS}-token requests: {after_s:.2f} s "
          f"(alone {short_s:.2f} s; one {MAX_TOKENS}-token answer {long_s:.2f} s)")
    # Every dropped request generating to its end would take 32 long answers first.
    assert after_s < short_s + 6 * long_s, (after_s, short_s, long_s)
