"""Held-out perplexity per eval set after every merge, with its standard error.

An eval set is its files' documents, packed, cut to `max_tokens` tokens. The loss of every
predicted token is kept by document, so the uncertainty of a perplexity comes from a bootstrap
over documents (the unit that varies), and two versions can be compared pairwise on the same
documents: the quality gate and the forgetting budget act only on changes larger than that
noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from trainer.config import EvalSetConfig
from workers.increments import increment_files, read_texts
from workers.packing import batch_tensors, pack, to_arrays, tokenize

DRAWS = 200  # bootstrap resamples
SEED = 0  # the resamples are the same for every version, so comparisons are paired


@dataclass(frozen=True)
class EvalSet:
    name: str
    ids: np.ndarray  # [N, L]
    lengths: np.ndarray  # [N]
    docs: np.ndarray  # [N, L] the document each token belongs to

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum())


@dataclass(frozen=True)
class EvalResult:
    """A version's perplexity on one set, its bootstrap standard error, and the summed loss
    and predicted tokens of each document (what paired comparisons resample)."""

    perplexity: float
    stderr: float = 0.0
    doc_nll: np.ndarray = field(default_factory=lambda: np.zeros(0))
    doc_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def to_dict(self) -> dict:
        return {"perplexity": self.perplexity, "stderr": self.stderr,
                "docs": {"nll": self.doc_nll.tolist(), "tokens": self.doc_tokens.tolist()}}

    @classmethod
    def from_dict(cls, data: dict) -> EvalResult:
        """From a manifest (older manifests hold the perplexity only: no error known)."""
        docs = data.get("docs", {})
        return cls(perplexity=data["perplexity"], stderr=data.get("stderr", 0.0),
                   doc_nll=np.asarray(docs.get("nll", []), dtype=np.float64),
                   doc_tokens=np.asarray(docs.get("tokens", []), dtype=np.float64))


def load_eval_set(config: EvalSetConfig, *, tokenizer, seq_len: int) -> EvalSet:
    """Every file of the set, packed, cut to the first `max_tokens` tokens."""
    texts = []
    for path in increment_files(config.path):
        texts.extend(t for t in read_texts(path, text_column=config.text_column) if t.strip())
    if not texts:
        raise ValueError(f"eval set {config.name!r}: {config.path} holds no text")
    table = pack(tokenize(tokenizer, texts), seq_len=seq_len,
                 eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
    ids, lengths = to_arrays(table)
    keep = max(1, -(-config.max_tokens // seq_len))
    ids, lengths = ids[:keep], lengths[:keep].copy()
    overflow = int(lengths.sum()) - config.max_tokens
    if overflow > 0 and lengths[-1] > overflow:
        lengths[-1] -= overflow
    return EvalSet(name=config.name, ids=ids, lengths=lengths,
                   docs=_documents(ids, lengths, eos_id=tokenizer.eos_token_id))


def _documents(ids: np.ndarray, lengths: np.ndarray, *, eos_id: int) -> np.ndarray:
    """The document of every token: documents were joined with EOS, which ends its own."""
    mask = np.arange(ids.shape[1])[None, :] < lengths[:, None]
    ends = (ids == eos_id) & mask
    flat = np.cumsum(ends.ravel()) - ends.ravel()  # EOS counted after its own token
    return flat.reshape(ids.shape)


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: EvalSet, *, batch_size: int = 8) -> EvalResult:
    """exp(mean next-token NLL) over all real tokens of the set, and its standard error."""
    model.eval()
    count = int(data.docs.max()) + 1 if data.docs.size else 0
    doc_nll, doc_tokens = np.zeros(count), np.zeros(count)
    for start in range(0, len(data.ids), batch_size):
        part = slice(start, start + batch_size)
        batch = batch_tensors(data.ids[part], data.lengths[part])
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
            ignore_index=-100, reduction="none").double().numpy()
        predicted = (targets != -100).reshape(-1).numpy()
        docs = data.docs[part][:, 1:].reshape(-1)[predicted]
        doc_nll += np.bincount(docs, weights=nll[predicted], minlength=count)
        doc_tokens += np.bincount(docs, minlength=count)
    mean = doc_nll.sum() / max(doc_tokens.sum(), 1)
    perplexity = _exp(mean)
    stderr = perplexity * log_stderr(doc_nll, doc_tokens)  # delta method
    return EvalResult(perplexity=perplexity, stderr=stderr, doc_nll=doc_nll,
                      doc_tokens=doc_tokens)


def _exp(x: float) -> float:
    """exp(x), infinite past float range: a diverged candidate (mean loss over ~709 nats)
    gets an infinite perplexity for the gate to reject, not an OverflowError."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def log_stderr(doc_nll: np.ndarray, doc_tokens: np.ndarray) -> float:
    """Standard error of the log perplexity, from a bootstrap over the documents."""
    return float(np.std(_resampled(doc_nll, doc_tokens)))


def perplexity(model: torch.nn.Module, data: EvalSet, *, batch_size: int = 8) -> float:
    return evaluate(model, data, batch_size=batch_size).perplexity


def _resampled(doc_nll: np.ndarray, doc_tokens: np.ndarray) -> np.ndarray:
    """Mean NLL (log perplexity) of DRAWS resamples of the documents, the same resamples for
    any version of the same set."""
    kept = doc_tokens > 0  # a trailing stretch of padding is no document
    doc_nll, doc_tokens = doc_nll[kept], doc_tokens[kept]
    if len(doc_nll) < 2:
        return np.zeros(1)
    picks = np.random.default_rng(SEED).integers(0, len(doc_nll), (DRAWS, len(doc_nll)))
    return doc_nll[picks].sum(axis=1) / np.maximum(doc_tokens[picks].sum(axis=1), 1)


def change_bounds(current: EvalResult, baseline: EvalResult, *, z: float
                  ) -> tuple[float, float, float]:
    """(rise, low, high): the relative perplexity change from `baseline` to `current` on the
    same documents, with a z-sided interval from a paired bootstrap. Without documents on
    either side (older manifests) the interval is the point itself."""
    rise = current.perplexity / baseline.perplexity - 1.0
    if len(current.doc_nll) != len(baseline.doc_nll) or len(current.doc_nll) < 2:
        return rise, rise, rise
    diff = (_resampled(current.doc_nll, current.doc_tokens)
            - _resampled(baseline.doc_nll, baseline.doc_tokens))
    spread = float(np.std(diff))
    log_rise = math.log1p(rise)
    return rise, _exp(log_rise - z * spread) - 1.0, _exp(log_rise + z * spread) - 1.0
