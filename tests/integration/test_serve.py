"""`tributary serve` on real Ray Serve, driven by the official `openai` client: answers equal
transformers' greedy generation of the version that gave them, a run's new versions are
served under load with no failed request, a rejected candidate never is, `--version` pins,
a LoRA run swaps only its adapter, and malformed requests get a 4xx that says why."""

from __future__ import annotations

import dataclasses
import threading
import time

import openai
import pytest
import ray.cloudpickle
import requests
import torch
from ray import serve
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.chaos import misbehaving
from tests.helpers import free_port, tiny_config
from tests.ray_fixtures import served_metrics
from trainer.checkpoint import all_manifests, latest_version
from trainer.coordinator import run_training
from trainer.model_source import ADAPTER_FILE, run_model
from trainer.serve.app import VERSION_HEADER, start_serving
from trainer.serve.launch import ServeBesideTraining
from trainer.serve.options import ServeOptions, key_digest

pytestmark = pytest.mark.integration
ray.cloudpickle.register_pickle_by_value(misbehaving)
# SmolLM2's tokenizer (it has a chat template) on the tests' tiny random Llama.
TOKENIZER = {"model.tokenizer": "smollm2"}
LORA = {"model.lora": "{r: 4, alpha: 8, target_modules: [q_proj, v_proj]}"}
PROMPT = "The state of the Union is"
CHAT = [{"role": "user", "content": "What is new this year?"}]
KEY = "test-key-1"
SERVE_METRICS = {"ray_tributary_serve_requests_total", "ray_tributary_serve_request_seconds_bucket",
                 "ray_tributary_serve_tokens_total", "ray_tributary_serve_version",
                 "ray_tributary_serve_swap_seconds"}


@pytest.fixture(scope="module")
def port(ray_cluster):
    chosen = free_port()
    yield chosen
    serve.shutdown()


def client(url: str, *, key: str = KEY) -> openai.OpenAI:
    # No retries: a failed request must show as a failure, not be hidden by a second try.
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def options(run_dir, port: int, **changes) -> ServeOptions:
    return ServeOptions(run_dir=str(run_dir), port=port, num_cpus=0, poll_s=0.2, **changes)


def greedy(model, tokenizer, prompt: list[int], max_tokens: int) -> str:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=max_tokens, do_sample=False)
    return tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True)


def test_answers_are_transformers_greedy_of_the_pinned_version_and_bad_requests_get_4xx(
        demo_root, notes_site, tmp_path, port):
    run_dir = tmp_path / "pinned"
    run_training(tiny_config(demo_root, notes_site, run_dir, rounds=1, **TOKENIZER))
    url = start_serving(options(run_dir, port, version="v0000", api_key_sha256=key_digest(KEY)),
                        app_name="pinned", route_prefix="/pinned")
    api = client(url)
    folder = run_dir / "versions" / "v0000"  # pinned: not latest (v0001)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    name = run_dir.name

    raw = api.completions.with_raw_response.create(model=name, prompt=PROMPT, max_tokens=12,
                                                   temperature=0)
    completion = raw.parse()
    assert raw.headers[VERSION_HEADER] == "v0000" and completion.model == f"{name}:v0000"
    prompt_ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    assert completion.choices[0].text == greedy(model, tokenizer, prompt_ids, 12)
    assert completion.usage.completion_tokens == 12
    assert completion.choices[0].finish_reason == "length"

    chat = api.chat.completions.create(model=name, messages=CHAT, max_tokens=10, temperature=0)
    chat_ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True,
                                             return_dict=True)["input_ids"]
    expected = greedy(model, tokenizer, list(chat_ids), 10)
    assert chat.choices[0].message.content == expected and chat.model == f"{name}:v0000"
    streamed = api.chat.completions.create(model=name, messages=CHAT, max_tokens=10,
                                           temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected

    # A stop string ends the answer before it, as OpenAI's API does.
    stop = expected[len(expected) // 2:][:2]
    assert stop, expected
    stopped = api.chat.completions.create(model=name, messages=CHAT, max_tokens=10,
                                          temperature=0, stop=[stop])
    assert stopped.choices[0].message.content == expected[:expected.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    # Sampling with a seed repeats itself.
    drawn = [api.completions.create(model=name, prompt=PROMPT, max_tokens=8, temperature=1.0,
                                    top_p=0.9, seed=7).choices[0].text for _ in range(2)]
    assert drawn[0] == drawn[1]

    models = api.models.list()
    assert {m.id for m in models.data} == {name, f"{name}:v0000"}

    with pytest.raises(openai.BadRequestError, match="unknown field 'bogus'"):
        api.completions.create(model=name, prompt=PROMPT, extra_body={"bogus": 1})
    with pytest.raises(openai.NotFoundError, match="model 'nope' is not served"):
        api.completions.create(model="nope", prompt=PROMPT)
    with pytest.raises(openai.BadRequestError, match="context is 128 tokens"):
        api.completions.create(model=name, prompt=PROMPT, max_tokens=400)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        api.completions.create(model=name, prompt=PROMPT, temperature=5)
    with pytest.raises(openai.AuthenticationError, match="API key"):
        client(url, key="wrong").completions.create(model=name, prompt=PROMPT)
    bad_json = requests.post(f"{url}/v1/completions", data="{not json",
                             headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["error"]["message"]
    assert requests.get(f"{url}/health", timeout=30).json()["version"] == "v0000"


def test_new_versions_are_served_under_load_with_no_failure_and_never_a_rejected_one(
        ray_cluster, demo_root, notes_site, tmp_path, port):
    run_dir = tmp_path / "follow"
    config = tiny_config(demo_root, notes_site, run_dir, rounds=1, **TOKENIZER)
    protected = [dataclasses.replace(e, protected=e.name == "shakespeare") for e in config.eval]
    config = dataclasses.replace(config, eval=protected)
    run_training(config)
    url = start_serving(options(run_dir, port), app_name="follow", route_prefix="/follow")
    load = Load(client(url), model=run_dir.name, clients=4).start()
    # Three more rounds while clients keep asking: round 3's candidate is made to regress
    # the protected set, so the gate rejects it.
    run_training(dataclasses.replace(config, rounds=4), resume=True,
                 worker_cls=misbehaving.noisy_worker(round_index=3, scale=0.5))
    final = latest_version(run_dir).name
    load.wait_for(final, timeout_s=60)
    load.stop()

    manifests = all_manifests(run_dir, include_rejected=True)
    accepted = {m["name"] for m in manifests if m["status"] == "accepted"}
    rejected = {m["name"] for m in manifests if m["status"] == "rejected"}
    assert rejected and final == "v0004", (rejected, final)
    assert load.failures == [], load.failures[:3]
    assert len(load.answers) > 20
    served = {version for version, _ in load.answers}
    assert served <= accepted and not served & rejected
    assert {"v0001", final} <= served  # it moved while answering
    # Each answer is the greedy answer of the version it names.
    for version in served:
        texts = {text for v, text in load.answers if v == version}
        assert len(texts) == 1, (version, texts)
    swaps = [s["version"] for s in requests.get(f"{url}/health", timeout=30).json()["swaps"]]
    assert served - {"v0001"} <= set(swaps) <= accepted and swaps == sorted(swaps)
    # Requests, latency, tokens, the version served and the swap time reach Prometheus.
    metrics = served_metrics(f"http://127.0.0.1:{ray_cluster['metrics_port']}/metrics",
                             run=run_dir.name, wait_for=SERVE_METRICS)
    assert SERVE_METRICS <= metrics


def test_lora_run_served_beside_training_swaps_only_the_adapter(
        demo_root, notes_site, tmp_path, port):
    run_dir = tmp_path / "lora"
    config = tiny_config(demo_root, notes_site, run_dir, rounds=1, **TOKENIZER, **LORA)
    server = ServeBesideTraining(options(run_dir, port)).start()  # `run --serve`
    run_training(config)
    server.thread.join(timeout=120)
    assert server.url is not None, server.error
    # The serve thread deployed as soon as v0000 existed, so the replica loaded the base
    # then; every later version is an adapter swap.
    run_training(dataclasses.replace(config, rounds=2), resume=True)
    health = wait_for_version(server.url, "v0002", timeout_s=60)
    adapter_size = (run_dir / "versions" / "v0002" / ADAPTER_FILE).stat().st_size
    assert [s["bytes_loaded"] for s in health["swaps"]][-1] == adapter_size

    tokenizer = AutoTokenizer.from_pretrained(run_dir / "versions" / "v0002")
    model = run_model(config.model, tokenizer=tokenizer, seed=config.run.seed,
                      version_dir=run_dir / "versions" / "v0002").eval()
    prompt_ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    answer = client(server.url).completions.create(model=run_dir.name, prompt=PROMPT,
                                                   max_tokens=10, temperature=0)
    assert answer.model == f"{run_dir.name}:v0002"
    assert answer.choices[0].text == greedy(model, tokenizer, prompt_ids, 10)
    serve.delete("tributary")


def wait_for_version(url: str, version: str, *, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        health = requests.get(f"{url}/health", timeout=30).json()
        if health["version"] == version or time.monotonic() > deadline:
            assert health["version"] == version, health
            return health
        time.sleep(0.2)


class Load:
    """Clients asking the same greedy completion over and over, each on its own thread."""

    def __init__(self, api: openai.OpenAI, *, model: str, clients: int) -> None:
        self.api, self.model = api, model
        self.answers: list[tuple[str, str]] = []  # (version, text)
        self.failures: list[str] = []
        self.stopped = threading.Event()
        self.threads = [threading.Thread(target=self._ask, daemon=True) for _ in range(clients)]

    def start(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def _ask(self) -> None:
        while not self.stopped.is_set():
            try:
                answer = self.api.completions.create(model=self.model, prompt=PROMPT,
                                                     max_tokens=8, temperature=0)
                self.answers.append((answer.model.rsplit(":", 1)[1], answer.choices[0].text))
            except Exception as exc:  # noqa: BLE001 - every failure is the test's finding
                self.failures.append(repr(exc))

    def wait_for(self, version: str, *, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(v == version for v, _ in self.answers[-8:]):
                return
            time.sleep(0.2)

    def stop(self) -> None:
        self.stopped.set()
        for thread in self.threads:
            thread.join(timeout=60)
