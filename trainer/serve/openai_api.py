"""The OpenAI wire format: requests checked into what generation needs, responses and errors.

Requests are strict: an unknown field, a value out of range, a prompt that does not fit the
context or a model the server does not serve is a 4xx whose message names the field and what
to do, in OpenAI's error shape ({"error": {"message", "type", "param", "code"}}), so the
official clients raise their usual exceptions.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from trainer.serve.backend import Sampling

MAX_STOPS = 4  # as OpenAI's API
# Temperatures below this are greedy: a draw at 1e-5 is the argmax unless the two best logits
# are within ~1e-4 nats, and far smaller ones overflow logits / temperature to inf (NaN draws).
GREEDY_BELOW = 1e-5
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes
MAX_BODY_BYTES = 4 * 2**20  # read no more of a request: checked before anything is parsed


class ApiError(Exception):
    """A request the server refuses: HTTP `status`, OpenAI error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "not_found_error"}.get(
            self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param,
                          "code": self.code}}


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream: bool = False
    stream_options: dict[str, bool] | None = None  # {"include_usage": true}
    n: int = Field(default=1, ge=1, le=1)  # one answer per request
    user: str | None = None


class CompletionRequest(_Common):
    prompt: str | list[int]
    max_tokens: int | None = Field(default=None, ge=1)


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str | list[dict[str, str]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or "text" not in part:
                raise ApiError(400, "only text content parts ({\"type\": \"text\", \"text\": "
                               "...}) are supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


@dataclass(frozen=True)
class Limits:
    """What the server allows: the model's context and a cap on new tokens per request."""
    context_tokens: int
    max_tokens: int


@dataclass(frozen=True)
class Job:
    """A checked request: what to generate and how to answer."""
    chat: bool
    prompt: list[int]
    sampling: Sampling
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


def openapi_schemas() -> dict:
    """JSON schemas of the request bodies, as OpenAPI components (for /openapi.json)."""
    from pydantic.json_schema import models_json_schema

    _, schemas = models_json_schema([(CompletionRequest, "validation"), (ChatRequest, "validation")],
                                    ref_template="#/components/schemas/{model}")
    return schemas["$defs"]


def parse(raw: bytes, kind: type[_Common]) -> _Common:
    if len(raw) > MAX_BODY_BYTES:
        raise body_too_large()
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # also an integer of over 4300 digits
        raise ApiError(400, f"the request body is not valid JSON ({exc}); send a JSON object "
                       "with Content-Type: application/json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return kind.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or None
        if first["type"] == "extra_forbidden":
            known = ", ".join(sorted(kind.model_fields))
            raise ApiError(400, f"unknown field {field!r}; this server accepts: {known}",
                           param=field, code="unknown_field") from None
        raise ApiError(400, f"{field}: {first['msg']}", param=field,
                       code="invalid_value") from None


def body_too_large() -> ApiError:
    return ApiError(413, f"the request body is over {MAX_BODY_BYTES} bytes; send a shorter "
                    "prompt (the model's context holds far less)", code="body_too_large")


def job(request: _Common, *, tokenizer, limits: Limits) -> Job:
    """Tokenize the prompt and check every limit."""
    chat = isinstance(request, ChatRequest)
    prompt = _chat_prompt(request, tokenizer) if chat else _prompt(request, tokenizer)
    if not prompt:
        raise ApiError(400, "the prompt is empty", param="messages" if chat else "prompt")
    room = limits.context_tokens - len(prompt)
    asked = (request.max_completion_tokens or request.max_tokens) if chat else request.max_tokens
    if asked is None:  # OpenAI's defaults: 16 for completions, the rest of the context for chat
        asked = min(room, limits.max_tokens) if chat else min(16, room, limits.max_tokens)
    if asked > limits.max_tokens:
        raise ApiError(400, f"max_tokens is {asked}; this server generates at most "
                       f"{limits.max_tokens} tokens per request (tributary serve --max-tokens)",
                       param="max_tokens", code="too_many_tokens")
    if room < 1 or asked > room:
        raise ApiError(400, f"the prompt has {len(prompt)} tokens and max_tokens asks for "
                       f"{asked}, but the model's context is {limits.context_tokens} tokens; "
                       "shorten the prompt or lower max_tokens", param="max_tokens",
                       code="context_length_exceeded")
    stops = _stops(request.stop)
    temperature = 0.0 if request.temperature < GREEDY_BELOW else request.temperature
    include_usage = bool((request.stream_options or {}).get("include_usage"))
    return Job(chat=chat, prompt=prompt, stop=stops, stream=request.stream,
               include_usage=include_usage,
               sampling=Sampling(max_tokens=asked, temperature=temperature,
                                 top_p=request.top_p, seed=request.seed))


def _prompt(request: CompletionRequest, tokenizer) -> list[int]:
    if isinstance(request.prompt, list):
        vocab = len(tokenizer)
        if any(not 0 <= t < vocab for t in request.prompt):
            raise ApiError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        return list(request.prompt)
    return tokenizer(request.prompt, add_special_tokens=False)["input_ids"]


def _chat_prompt(request: ChatRequest, tokenizer) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions",
                       param="messages", code="no_chat_template")
    messages = [{"role": m.role, "content": m.text()} for m in request.messages]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                        return_dict=True)["input_ids"]
    return list(ids)


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOPS or any(not s for s in stops):
        raise ApiError(400, f"stop takes up to {MAX_STOPS} non-empty strings", param="stop")
    return tuple(stops)


class Reply:
    """Response bodies of one request, in the completions or the chat shape."""

    def __init__(self, *, chat: bool, model: str, prompt_tokens: int) -> None:
        self.chat, self.model, self.prompt_tokens = chat, model, prompt_tokens
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def whole(self, text: str, *, reason: str, completion_tokens: int) -> dict:
        choice = ({"index": 0, "message": {"role": "assistant", "content": text},
                   "finish_reason": reason} if self.chat
                  else {"index": 0, "text": text, "finish_reason": reason, "logprobs": None})
        return {**self._head("chat.completion" if self.chat else "text_completion"),
                "choices": [choice], "usage": self.usage(completion_tokens)}

    def chunk(self, text: str | None, *, reason: str | None = None,
              first: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else (
                {"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(kind), "choices": [choice]}

    def usage_chunk(self, completion_tokens: int) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(kind), "choices": [], "usage": self.usage(completion_tokens)}

    def usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


def sse(data: dict | str) -> bytes:
    """One server-sent event."""
    text = data if isinstance(data, str) else json.dumps(data)
    return f"data: {text}\n\n".encode()
