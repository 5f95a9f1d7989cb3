"""Generation backends: load a version beside the one in use, swap, generate token by token.

`Backend` is the interface the server needs; `TransformersBackend` implements it with a
transformers model on CPU or GPU and a token loop of its own (KV cache carried, one token
handed out at a time, so streaming and cancelling need no second thread). A vLLM backend
would implement the same members.

Swaps never break a request: a request takes the current version when it starts (under the
generation lock, one generation at a time per replica) and keeps it to its last token. A
full-weight version is loaded into a second model beside the current one and the reference
moves; the old model is freed when its last request ends. A LoRA version loads only the
adapter tensors; they are copied into the shared model under the lock, between requests.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from trainer.config import Config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    """What one request asks of generation (already validated)."""
    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class Prepared:
    """A version loaded beside the current one, ready to swap in."""
    version: str
    model: torch.nn.Module | None  # full weights: a new model; LoRA: None (adapter only)
    adapter: dict[str, torch.Tensor] | None
    bytes_loaded: int  # what the swap read from disk
    seconds: float


class Backend(Protocol):
    tokenizer: object
    version: str | None
    context_tokens: int

    def prepare(self, folder: Path, *, version: str) -> Prepared: ...
    def swap(self, prepared: Prepared) -> None: ...
    def session(self) -> AbstractContextManager[Session]: ...


class TransformersBackend:
    """A run's versions as transformers models (a LoRA run: the base plus the adapter)."""

    def __init__(self, *, config: Config, first: Path, version: str,
                 device: str = "cpu") -> None:
        self.config = config  # the run's: its model source and LoRA spec
        self.device = device
        self.dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        self.lock = threading.Lock()  # one generation at a time; LoRA swaps between them
        self.tokenizer = _tokenizer(first)
        # (model, version) as one value: a request reads both at once, so a swap between
        # two reads can never pair one version's weights with another's name.
        self.current: tuple[torch.nn.Module, str] | None = None
        self.swap(self.prepare(first, version=version))
        # The same for every version of a run: worked out once, not per request.
        self.context_tokens = int(getattr(self._base_config(), "max_position_embeddings", 2048))
        self.eos, self.cache_arg = self._eos(), self._cache_arg()

    @property
    def model(self) -> torch.nn.Module:
        return self.current[0]

    @property
    def version(self) -> str | None:
        return self.current[1] if self.current else None

    @property
    def lora(self) -> bool:
        return self.config.model.lora is not None

    def prepare(self, folder: Path, *, version: str) -> Prepared:
        """Load `folder` beside the current version (the slow part of a swap)."""
        started = time.perf_counter()
        if self.lora and self.current is not None:  # the base is loaded: read the adapter only
            from safetensors.torch import load_file

            from trainer.model_source import ADAPTER_FILE

            path = folder / ADAPTER_FILE
            adapter = load_file(str(path), device=self.device)
            return Prepared(version, None, adapter, path.stat().st_size,
                            time.perf_counter() - started)
        model = self._load_model(folder)
        size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        return Prepared(version, model, None, size, time.perf_counter() - started)

    def swap(self, prepared: Prepared) -> None:
        """Make `prepared` the version new requests get (fast)."""
        if prepared.model is not None:  # requests in flight keep the model they hold
            self.current = (prepared.model, prepared.version)
            return
        from peft import set_peft_model_state_dict

        with self.lock:  # between generations: no request sees half an adapter
            set_peft_model_state_dict(self.model, prepared.adapter)
            self.current = (self.model, prepared.version)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """The current version, held for one request: one generation at a time per replica
        (the cores are shared anyway), and a LoRA swap waits for it to end."""
        with self.lock:
            model, version = self.current
            yield Session(version=version, model=model, eos=self.eos, device=self.device,
                          cache_arg=self.cache_arg)

    def _eos(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id, getattr(self._base_config(), "eos_token_id", None)}
        flat = set()
        for item in ids:
            flat |= set(item) if isinstance(item, list) else {item}
        return sorted(i for i in flat if i is not None)

    def _cache_arg(self) -> str:
        """The forward argument that carries the KV cache: `cache` in newer transformers 5
        releases, `past_key_values` before (and deprecated since)."""
        import inspect

        base = self.model.get_base_model() if self.lora else self.model
        return "cache" if "cache" in inspect.signature(base.forward).parameters else (
            "past_key_values")

    def _base_config(self):
        model = self.model.get_base_model() if self.lora else self.model
        return model.config

    def _load_model(self, folder: Path) -> torch.nn.Module:
        from trainer.model_source import run_model

        model = run_model(self.config.model, tokenizer=self.tokenizer,
                          seed=self.config.run.seed, version_dir=folder)
        return model.to(device=self.device, dtype=self.dtype).eval()


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@dataclass(frozen=True)
class Session:
    """One request's hold on a version."""
    version: str
    model: torch.nn.Module
    eos: list[int]
    device: str
    cache_arg: str = "cache"

    def tokens(self, prompt: list[int], sampling: Sampling, *,
               cancelled: threading.Event) -> Iterator[int]:
        """New token ids one by one (the model's KV cache carried between steps), until
        max_tokens, an end-of-sequence token, or `cancelled` (client gone, stop text found)."""
        generator = None
        if sampling.temperature > 0:  # this request's own RNG: seeded, or fresh
            generator = torch.Generator(device=self.device)
            if sampling.seed is None:
                generator.seed()
            else:
                generator.manual_seed(sampling.seed)
        ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
        past = None
        with torch.inference_mode():
            for _ in range(sampling.max_tokens):
                if cancelled.is_set():  # also before the first step: a request given up on
                    return  # while it waited for the replica costs no forward pass
                out = self.model(input_ids=ids, use_cache=True, **{self.cache_arg: past})
                past = out[self.cache_arg]
                token = pick(out.logits[0, -1].float(), sampling, generator=generator)
                yield token
                if token in self.eos:
                    return
                ids = torch.tensor([[token]], dtype=torch.long, device=self.device)


def pick(logits: torch.Tensor, sampling: Sampling, *,
         generator: torch.Generator | None) -> int:
    """The next token: argmax at temperature 0, else a draw from the temperature-scaled
    distribution cut to its top_p nucleus (the smallest set of tokens holding top_p)."""
    if sampling.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass above each token
        cut = before >= sampling.top_p  # (top_p is compared in float32: 5e-324 is 0)
        cut[0] = False  # the top token always stays
        sorted_probs[cut] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))

