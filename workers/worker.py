"""The site side of a round: a plain class, wrapped by the coordinator as a named Ray actor.

One round, top to bottom (`train_round`): load the global weights into the engine, read the
next unconsumed rows of the site's increments, pack them, mix in replay sequences, take the
optimizer steps, and return θ_local − θ_global with the exact rows consumed.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from workers import engine as ds
from workers.fsio import fsync_dir, fsync_tree
from workers.increments import cursor_after, increment_files, iter_rows, merge_ranges
from workers.model import build_model
from workers.packing import batch_tensors, empty_sequences, pack, real_tokens, to_arrays
from workers.replay import ReplayStore, site_key
from workers.types import Cursor, NoData, RowRange, SiteSpec, TrainSpec, WorkerUpdate

log = logging.getLogger(__name__)

# sample(n, seed) -> sequences table; seed is a list of ints so every (run, round, site)
# draws its own reproducible sample whatever order the workers ask in.
ReplaySampler = Callable[[int, list], pa.Table]
KEEP_STATES = 2


class Worker:
    def __init__(self, *, site: SiteSpec, model_config: dict, tokenizer, train: TrainSpec,
                 replay: ReplaySampler | None = None, state_dir: str | None = None,
                 quarantine_dir: str | None = None) -> None:
        self.site = site
        self.train = train
        self.tokenizer = tokenizer
        self.replay = replay
        self.local_replay = None
        if train.local_replay_capacity > 0:  # replay.scope: site — samples stay here
            self.local_replay = ReplayStore(capacity_per_site=train.local_replay_capacity,
                                            seed=train.seed)
            self.replay = self.local_replay.sample
        self.pending: pa.Table | None = None  # this round's sequences, kept until commit
        self.state_dir = Path(state_dir) if state_dir else None
        self.quarantine_dir = Path(quarantine_dir) if quarantine_dir else None
        self.quarantined: list[dict] = []  # bad files met during the current round
        ds.init_single_rank_group()
        torch.manual_seed(train.seed)
        model = build_model(model_config)
        self.engine = ds.build_engine(model, ds_config=train.deepspeed, lr=train.lr,
                                      weight_decay=train.weight_decay, micro_batch=train.batch_size)
        self.device = self.engine.device
        # The optimizer state on disk matches the last round the coordinator accepted; after
        # training a round that is then not accepted, the in-memory state is rolled back.
        self.committed_round = 0
        self.dirty = False

    def ready(self) -> dict:
        return {"site": self.site.name, "host": socket.gethostname(), "pid": os.getpid(),
                "device": str(self.device)}

    # ------------------------------------------------------------------ one round

    def train_round(self, *, round_index: int, global_weights: dict, cursor: Cursor
                    ) -> WorkerUpdate | NoData:
        if self.dirty:  # the last round trained here was not accepted: undo its state
            self.restore(round_index=self.committed_round)
        self.pending, self.quarantined = None, []
        replay_per_batch = self._replay_per_batch()
        new_per_batch = self.train.batch_size - replay_per_batch
        ranges, sequences = self._read_new(cursor, need=self.train.local_steps * new_per_batch)
        if not ranges:
            return NoData(worker_id=self.site.name, round=round_index,
                          quarantined=tuple(self.quarantined))
        if sequences.num_rows == 0:  # only blank rows: consumed, nothing to train
            return self._update(round_index, {}, ranges, cursor, sequences, replay=None,
                                losses=[], seconds=0.0)
        steps = max(1, math.ceil(sequences.num_rows / new_per_batch))
        replay = self._sample_replay(steps * replay_per_batch, round_index)
        ds.load_weights_(self.engine, global_weights)
        started = time.perf_counter()
        self.dirty = True
        self.pending = sequences
        losses = self._steps(sequences, replay, steps=steps, new_per_batch=new_per_batch)
        train_seconds = time.perf_counter() - started
        return self._update(round_index, self._delta(global_weights), ranges, cursor, sequences,
                            replay=replay, losses=losses, seconds=train_seconds)

    def _update(self, round_index: int, delta: dict, ranges: list[RowRange], cursor: Cursor,
                sequences: pa.Table, *, replay: pa.Table | None, losses: list[float],
                seconds: float) -> WorkerUpdate:
        consumed = merge_ranges(ranges)
        new_tokens = real_tokens(sequences)
        replay_tokens = real_tokens(replay) if replay is not None else 0
        shared = sequences if self.local_replay is None else empty_sequences()
        return WorkerUpdate(
            worker_id=self.site.name, round=round_index, delta=delta, weight=float(new_tokens),
            consumed=consumed, cursor=cursor_after(consumed, cursor), sequences=shared,
            quarantined=tuple(self.quarantined),
            metrics={"loss": float(np.mean(losses)) if losses else None,
                     "steps": len(losses), "new_tokens": new_tokens,
                     "replay_tokens": replay_tokens, "train_seconds": seconds,
                     "tokens_per_s": (new_tokens + replay_tokens) / seconds if seconds else 0.0})

    def _replay_per_batch(self) -> int:
        if self.replay is None or self.train.replay_ratio <= 0:
            return 0
        # The config check keeps this in [1, batch_size - 1]: every batch has new data.
        return round(self.train.replay_ratio * self.train.batch_size)

    def _read_new(self, cursor: Cursor, *, need: int) -> tuple[list[RowRange], pa.Table]:
        """Whole rows from the cursor until `need` sequences are filled (rows are never split)."""
        tok, spec = self.tokenizer, self.train
        budget = need * spec.seq_len
        files = increment_files(self.site.path)
        ranges, token_lists, total = [], [], 0
        rows = iter_rows(files, cursor, text_column=self.site.text_column,
                         max_row_chars=spec.max_row_chars, on_bad_file=self._quarantine)
        for row_range, text in rows:
            if total >= budget:
                break
            ranges.append(row_range)
            if text.strip():  # a blank row is consumed, but adds no tokens
                ids = tok(text, add_special_tokens=False)["input_ids"]
                token_lists.append(ids)
                total += len(ids) + 1
        if not token_lists:
            return ranges, empty_sequences()
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return ranges, pack(token_lists, seq_len=spec.seq_len, eos_id=tok.eos_token_id, pad_id=pad)

    def _quarantine(self, path: Path, reason: str) -> None:
        """Set a bad increment file aside with a reason file; the site goes on with the next."""
        log.error("site %s: %s; moving it to quarantine", self.site.name, reason)
        entry = {"file": str(path), "reason": reason}
        if self.quarantine_dir is not None and path.exists():
            self.quarantine_dir.mkdir(parents=True, exist_ok=True)
            target = self.quarantine_dir / path.name
            shutil.move(str(path), target)
            target.with_name(target.name + ".reason.txt").write_text(reason + "\n")
            entry["moved_to"] = str(target)
        self.quarantined.append(entry)

    def _sample_replay(self, count: int, round_index: int) -> pa.Table:
        if count == 0 or self.replay is None:
            return empty_sequences()
        return self.replay(count, [self.train.seed, round_index, site_key(self.site.name)])

    def _steps(self, new: pa.Table, replay: pa.Table, *, steps: int, new_per_batch: int
               ) -> list[float]:
        new_ids, new_len = to_arrays(new)
        rep_ids, rep_len = to_arrays(replay)
        rep_per = len(rep_ids) // steps if len(rep_ids) else 0
        self.engine.train()
        losses = []
        for step in range(steps):
            ids = new_ids[step * new_per_batch:(step + 1) * new_per_batch]
            lengths = new_len[step * new_per_batch:(step + 1) * new_per_batch]
            if rep_per:
                ids = np.concatenate([ids, rep_ids[step * rep_per:(step + 1) * rep_per]])
                lengths = np.concatenate([lengths, rep_len[step * rep_per:(step + 1) * rep_per]])
            batch = {k: v.to(self.device) for k, v in batch_tensors(ids, lengths).items()}
            loss = self.engine(**batch).loss
            self.engine.backward(loss)
            self.engine.step()
            losses.append(float(loss.detach()))  # note: a device sync point, once per step
            if not math.isfinite(losses[-1]):
                log.warning("site %s: non-finite loss at step %d", self.site.name, step)
        return losses

    def _delta(self, global_weights: dict) -> dict[str, np.ndarray]:
        delta = {}
        for name, param in ds.local_weights(self.engine).items():
            base = torch.as_tensor(global_weights[name], dtype=torch.float32)
            delta[name] = (param.to("cpu", torch.float32) - base).numpy()
        return delta

    # ------------------------------------------------------------------ optimizer state

    def commit(self, *, round_index: int) -> None:
        """The coordinator accepted this worker's update of `round_index`: persist the
        optimizer state, keeping the last few so a resume from an older version finds its own."""
        if self.local_replay is not None and self.pending is not None:
            self.local_replay.add(self.site.name, self.pending)
        if self.state_dir is not None:
            final = self.state_dir / f"round-{round_index:04d}"
            tmp = self.state_dir / f".tmp-round-{round_index:04d}"
            shutil.rmtree(tmp, ignore_errors=True)
            ds.save_optimizer_state(self.engine.optimizer, tmp)
            if self.local_replay is not None:
                self.local_replay.save(str(tmp / "replay"))
            fsync_tree(tmp)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            fsync_dir(self.state_dir)
            for old in sorted(self.state_dir.glob("round-*"))[:-KEEP_STATES]:
                shutil.rmtree(old, ignore_errors=True)
        self.committed_round, self.dirty, self.pending = round_index, False, None

    def restore(self, *, round_index: int) -> int:
        """Load the newest optimizer state committed at or before `round_index` (a site that
        sat out later rounds last trained earlier), or start fresh if there is none.
        Returns the round whose state was loaded (0: fresh)."""
        saved = []
        if self.state_dir is not None and self.state_dir.is_dir():
            saved = [p for p in sorted(self.state_dir.glob("round-*"))
                     if int(p.name.split("-")[1]) <= round_index]
        if saved:
            ds.load_optimizer_state(self.engine.optimizer, saved[-1])
            self.committed_round = int(saved[-1].name.split("-")[1])
        else:
            self.engine.optimizer.state.clear()  # a fresh AdamW: no moments yet
            self.committed_round = 0
        if self.local_replay is not None:
            self.local_replay.sites = {}
            if saved and (saved[-1] / "replay").is_dir():
                self.local_replay.restore(str(saved[-1] / "replay"))
        self.dirty, self.pending = False, None
        return self.committed_round
