"""The serving pieces that need no Ray: stop strings across streamed pieces, incremental
decoding, nucleus sampling, request checking (each 4xx), and which versions may be served."""

from __future__ import annotations

import json
import os

import pytest
import torch

from trainer.serve.backend import Sampling, pick
from trainer.serve.generate import StopText, TextStream
from trainer.serve.openai_api import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    Limits,
    job,
    parse,
)
from trainer.serve.versions import VersionError, VersionSource

LIMITS = Limits(context_tokens=32, max_tokens=20)


class Words:
    """A tokenizer over a fixed word list (ids are list positions); no chat template."""

    words = ("hello", " world", " stop", "!", "\n")
    chat_template = None

    def __len__(self) -> int:
        return len(self.words)

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        ids, rest = [], text
        while rest:
            index = next(i for i, w in enumerate(self.words) if rest.startswith(w))
            ids.append(index)
            rest = rest[len(self.words[index]):]
        return {"input_ids": ids}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(self.words[i] for i in ids)


def test_stop_text_cuts_at_a_stop_string_split_across_pieces():
    stops = StopText(["STOP", "xy"])
    assert stops.feed("abc ST") == ("abc ", False)  # "ST" might begin STOP: held back
    assert stops.feed("O") == ("", False)
    assert stops.feed("P and more") == ("", True)
    other = StopText(["STOP"])
    assert other.feed("a S") == ("a ", False)
    assert other.feed("o on") == ("So on", False)  # it was not a stop after all
    assert other.flush() == ""
    assert StopText([]).feed("anything") == ("anything", False)


def test_text_stream_waits_for_a_whole_character():
    class Bytes:
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    stream = TextStream(Bytes())
    euro = "€".encode()  # three bytes: one token each
    assert [stream.push(b) for b in b"a"] == ["a"]
    assert [stream.push(b) for b in euro] == ["", "", "€"]
    assert stream.flush() == ""


def test_pick_is_argmax_at_temperature_zero_and_stays_in_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert pick(logits, Sampling(max_tokens=1, temperature=0), generator=None) == 0
    generator = torch.Generator().manual_seed(0)
    nucleus = Sampling(max_tokens=1, temperature=1.0, top_p=0.7)  # 0.5 + 0.3 reach it
    drawn = {pick(logits, nucleus, generator=generator) for _ in range(200)}
    assert drawn == {0, 1}
    tiniest = Sampling(max_tokens=1, temperature=1.0, top_p=5e-324)  # 0 in float32
    assert {pick(logits, tiniest, generator=generator) for _ in range(20)} == {0}
    everything = Sampling(max_tokens=1, temperature=1.0, top_p=1.0)
    assert {pick(logits, everything, generator=generator) for _ in range(400)} == {0, 1, 2, 3}


def test_requests_are_checked_and_each_problem_is_a_4xx_that_names_it():
    tokenizer = Words()

    def refused(body, kind=CompletionRequest) -> ApiError:
        with pytest.raises(ApiError) as caught:
            job(parse(json.dumps(body).encode(), kind), tokenizer=tokenizer, limits=LIMITS)
        return caught.value

    ok = job(parse(b'{"model": "m", "prompt": "hello world", "stop": "!"}', CompletionRequest),
             tokenizer=tokenizer, limits=LIMITS)
    assert ok.prompt == [0, 1] and ok.sampling.max_tokens == 16 and ok.stop == ("!",)
    with pytest.raises(ApiError, match="not valid JSON"):
        parse(b"{nope", CompletionRequest)
    with pytest.raises(ApiError, match="must be a JSON object"):
        parse(b"[1]", CompletionRequest)
    assert refused({"model": "m", "prompt": "hello", "logprobs": 3}).code == "unknown_field"
    assert refused({"model": "m", "prompt": "hello", "max_tokens": 21}).code == "too_many_tokens"
    long_prompt = {"model": "m", "prompt": "hello" * 25, "max_tokens": 10}
    assert refused(long_prompt).code == "context_length_exceeded"
    assert refused({"model": "m", "prompt": "hello", "top_p": 0}).param == "top_p"
    assert refused({"model": "m", "prompt": "hello", "n": 2}).param == "n"
    assert refused({"model": "m", "prompt": [0, 99]}).param == "prompt"
    assert refused({"model": "m", "prompt": "hello", "stop": ["a"] * 5}).param == "stop"
    assert refused({"model": "m", "prompt": ""}).status == 400
    chat = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}
    assert refused(chat, ChatRequest).code == "no_chat_template"
    assert refused({**chat, "messages": []}, ChatRequest).param == "messages"
    bad_role = {"model": "m", "messages": [{"role": "robot", "content": "hi"}]}
    assert refused(bad_role, ChatRequest).param.startswith("messages.0.role")


def test_only_accepted_versions_with_weights_are_served(tmp_path):
    run = tmp_path / "run"
    versions = run / "versions"
    for name, status, weights in (("v0000", "accepted", False), ("v0001", "accepted", True)):
        (versions / name).mkdir(parents=True)
        (versions / name / "manifest.json").write_text(json.dumps({"status": status}))
        if weights:
            (versions / name / "model.safetensors").write_bytes(b"x")
    (versions / "rejected" / "v0002").mkdir(parents=True)
    os.symlink("v0001", versions / "latest")
    source = VersionSource(run)

    assert source.latest() == "v0001" and source.folder("v0001") == versions / "v0001"
    with pytest.raises(VersionError, match="rejected by the quality gate"):
        source.folder("v0002")
    with pytest.raises(VersionError, match="pruned"):
        source.folder("v0000")
    with pytest.raises(VersionError, match="not a version name"):
        source.folder("../../etc")
    assert VersionSource(tmp_path / "empty").latest() is None


def test_a_run_on_an_object_store_is_served_from_what_it_published(s3, tmp_path):
    """A real S3-compatible server (moto on 127.0.0.1): LATEST names the version, a version
    is read only once its completion marker is there, and copied whole into the cache."""
    from workers.storage import join, publish_folder, upload_tree, write_text

    s3.filesystem().create_dir("served")
    run = s3.uri("served/run")
    version = tmp_path / "v0001"
    version.mkdir()
    (version / "manifest.json").write_text(json.dumps({"status": "accepted"}))
    (version / "model.safetensors").write_bytes(b"weights")
    source = VersionSource(run, cache=tmp_path / "cache")
    assert source.latest() is None
    upload_tree(version, join(run, "versions", "v0002"))  # uploading: no marker yet
    publish_folder(version, join(run, "versions", "v0001"))
    write_text(join(run, "versions", "LATEST"), "v0001\n")

    assert source.latest() == "v0001"
    local = source.folder("v0001")
    assert (local / "model.safetensors").read_bytes() == b"weights"
    assert local.is_relative_to(tmp_path / "cache")
    with pytest.raises(VersionError, match="not an accepted, published version"):
        source.folder("v0002")
