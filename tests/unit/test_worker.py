"""The Worker as a plain class (no Ray): a real DeepSpeed engine on CPU, real demo data."""

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest

from trainer.config import ModelConfig
from trainer.model_source import load_start_model, load_tokenizer
from workers.compression import Packed, unpack_delta
from workers.increments import increment_step
from workers.replay import ReplayConfig, ReplayStore
from workers.schedule import LrSchedule, lr_at
from workers.types import (
    Cursor,
    EarlyStopping,
    NoData,
    RoundTask,
    RowRange,
    SiteConfig,
    TrainSpec,
    WorkerConfig,
)
from workers.worker import Worker

ARCH = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 128}


@pytest.fixture(scope="module")
def setup():
    tokenizer = load_tokenizer("gpt2")
    model = load_start_model(ModelConfig(source="random", tokenizer="gpt2", architecture=ARCH),
                             tokenizer=tokenizer, seed=0)
    weights = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
    return tokenizer, model.config.to_dict(), weights


WORKER_FIELDS = {f.name for f in dataclasses.fields(WorkerConfig)}


def make_worker(setup, demo_root, tmp_path, replay=None, replay_ratio=0.5, **overrides):
    """A Worker on the demo's code site; `overrides` go to its worker config or TrainSpec."""
    tokenizer, model_config, _ = setup
    worker = WorkerConfig(**{"local_steps": 2, "batch_size": 2, "seq_len": 32, "lr": 1e-3,
                             **{k: v for k, v in overrides.items() if k in WORKER_FIELDS}})
    train = TrainSpec(worker=worker, replay=ReplayConfig(ratio=replay_ratio),
                      deepspeed={"zero_optimization": {"stage": 0}}, seed=0,
                      **{k: v for k, v in overrides.items() if k not in WORKER_FIELDS})
    site = SiteConfig("code", str(demo_root / "data" / "demo" / "code"), "source")
    return Worker(site=site, model_config=model_config, tokenizer=tokenizer, train=train,
                  replay=replay, state_dir=str(tmp_path / "state"))


def task(worker: Worker, round_index: int, cursor: Cursor) -> RoundTask:
    return worker.plan(round_index=round_index, cursor=cursor)


def test_round_returns_delta_weight_and_exact_rows(setup, demo_root, tmp_path):
    worker = make_worker(setup, demo_root, tmp_path)
    update = worker.train_round(task(worker, 1, Cursor()), setup[2])
    assert set(update.delta) == set(setup[2])
    assert all(np.isfinite(d).all() for d in update.delta.values())
    assert max(np.abs(d).max() for d in update.delta.values()) > 0
    assert update.weight == update.metrics["new_tokens"] == int(
        np.asarray(update.sequences.column("length")).sum())
    # Exactly local_steps (2) batches of 2 × 32 tokens: the first module's source is longer,
    # so the round ends inside row 0 and the cursor points at the next token of that row.
    assert update.metrics["steps"] == 2 and update.weight == 2 * 2 * 32
    assert update.consumed == (RowRange("01-text.jsonl", 0, 1, end_token=128),)
    # The LR schedule's position advances with the rows.
    assert update.cursor == Cursor("01-text.jsonl", 0, token=128, steps=2, run_steps=2)
    assert update.metrics["replay_tokens"] == 0  # no replay source given
    assert not (tmp_path / "state" / "round-0001").exists()  # nothing persists before commit
    worker.commit(round_index=1)
    worker.durable(round_index=1)  # written on a thread: on disk once this returns
    assert (tmp_path / "state" / "round-0001" / "optimizer.safetensors").is_file()


def test_same_inputs_give_identical_deltas_and_restore_continues_exactly(
        setup, demo_root, tmp_path):
    store = ReplayStore(capacity=64, seed=0)
    a = make_worker(setup, demo_root, tmp_path / "a", replay=store.sample)
    b = make_worker(setup, demo_root, tmp_path / "b", replay=store.sample)
    first_a = a.train_round(task(a, 1, Cursor()), setup[2])
    first_b = b.train_round(task(b, 1, Cursor()), setup[2])
    assert all(np.array_equal(first_a.delta[k], first_b.delta[k]) for k in first_a.delta)
    store.add("code", first_a.sequences, round_index=1)
    a.commit(round_index=1)
    # The state is written on a thread; a restart relies on it only once it is durable (the
    # coordinator's rule). Without this wait a busy machine restored nothing (restore -> 0).
    a.durable(round_index=1)

    second_a = a.train_round(task(a, 2, first_a.cursor), setup[2])
    assert second_a.metrics["replay_tokens"] > 0
    fresh = make_worker(setup, demo_root, tmp_path / "a")  # a restarted actor, same state_dir
    fresh.replay = store.sample
    assert fresh.restore(round_index=1) == 1
    second_fresh = fresh.train_round(task(fresh, 2, first_a.cursor), setup[2])
    assert all(np.array_equal(second_a.delta[k], second_fresh.delta[k]) for k in second_a.delta)
    # Round 2 was not accepted (no commit): a retry starts again from round 1's state.
    retry = a.train_round(task(a, 2, first_a.cursor), setup[2])
    assert all(np.array_equal(second_a.delta[k], retry.delta[k]) for k in second_a.delta)


def test_site_without_rows_left_sits_out(setup, demo_root, tmp_path):
    worker = make_worker(setup, demo_root, tmp_path)
    answer = worker.train_round(task(worker, 1, Cursor("99-none.jsonl", 0)), setup[2])
    assert isinstance(answer, NoData)


def test_worker_leaves_no_shared_memory_buffer_behind(setup, demo_root, tmp_path):
    """DeepSpeed's CPU comm op creates a 69 MB /dev/shm buffer per rank and never removes it;
    killed or restarted workers would leak one each."""
    make_worker(setup, demo_root, tmp_path)
    port = os.environ["MASTER_PORT"]
    assert list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_127.0.0.1_{port}_*")) == []


def delta_norm(update) -> float:
    return float(np.sqrt(sum((d.astype(np.float64) ** 2).sum() for d in update.delta.values())))


def test_lr_schedule_sets_every_step_and_carries_across_rounds(setup, demo_root, tmp_path):
    schedule = LrSchedule(kind="rewarm", warmup_steps=2, decay_steps=3, min_lr_ratio=0.1)
    worker = make_worker(setup, demo_root, tmp_path, lr_schedule=schedule)
    first = worker.train_round(task(worker, 1, Cursor()), setup[2])
    steps = first.metrics["steps"]
    assert first.metrics["lr"] == pytest.approx(
        [lr_at(schedule, peak=1e-3, increment_step=i, run_step=i) for i in range(steps)])
    assert first.metrics["lr"][0] < first.metrics["lr"][1]  # warming up from the floor
    assert worker.engine.optimizer.param_groups[0]["lr"] == pytest.approx(first.metrics["lr"][-1])
    worker.commit(round_index=1)
    second = worker.train_round(task(worker, 2, first.cursor), setup[2])
    start = increment_step(first.cursor, first_file=second.consumed[0].file)
    assert second.metrics["lr"][0] == pytest.approx(
        lr_at(schedule, peak=1e-3, increment_step=start, run_step=steps))


def test_proximal_term_keeps_the_site_near_the_global_weights(setup, demo_root, tmp_path):
    free = make_worker(setup, demo_root, tmp_path / "free")
    prox = make_worker(setup, demo_root, tmp_path / "prox", prox_mu=1.0)
    drifted = free.train_round(task(free, 1, Cursor()), setup[2])
    held = prox.train_round(task(prox, 1, Cursor()), setup[2])
    assert held.consumed == drifted.consumed and held.weight == drifted.weight
    assert delta_norm(held) < 0.5 * delta_norm(drifted)


@pytest.mark.parametrize(("lr", "stops_early"), [(1e-3, False), (5e-2, True)])
def test_early_stopping_ends_extra_epochs_when_holdout_loss_rises(
        setup, demo_root, tmp_path, lr, stops_early):
    stopping = EarlyStopping(max_epochs=5, holdout_fraction=0.25, patience=0)
    worker = make_worker(setup, demo_root, tmp_path, lr=lr, early_stopping=stopping)
    update = worker.train_round(task(worker, 1, Cursor()), setup[2])
    m, held_out = update.metrics, update.metrics["holdout_loss"]
    assert len(held_out) == m["epochs"] and m["steps"] % m["epochs"] == 0
    assert (m["epochs"] < 5) == stops_early
    if stops_early:  # the last pass made the held-out loss worse than the best before it
        assert held_out[-1] >= min(held_out[:-1])
    else:
        assert held_out == sorted(held_out, reverse=True)
    # Every pass weighs in; held-out rows are consumed but neither trained nor replayed.
    assert update.weight == m["new_tokens"] * m["epochs"]
    assert m["holdout_tokens"] > 0
    assert m["new_tokens"] == int(np.asarray(update.sequences.column("length")).sum())


def test_int8_delta_is_a_quarter_of_the_bytes_and_its_residual_is_kept(
        setup, demo_root, tmp_path):
    worker = make_worker(setup, demo_root, tmp_path, compression="int8")
    update = worker.train_round(task(worker, 1, Cursor()), setup[2])
    assert isinstance(update.delta, Packed)
    fp32_bytes = sum(a.nbytes for a in setup[2].values())
    assert update.metrics["bytes_received"] == fp32_bytes
    assert update.metrics["bytes_sent"] < 0.27 * fp32_bytes
    assert set(unpack_delta(update.delta)) == set(setup[2])
    worker.commit(round_index=1)
    worker.durable(round_index=1)
    kept = worker.residual
    assert kept is not None and max(np.abs(r).max() for r in kept.values()) > 0
    fresh = make_worker(setup, demo_root, tmp_path, compression="int8")  # a restarted actor
    fresh.restore(round_index=1)
    assert all(np.array_equal(kept[k], fresh.residual[k]) for k in kept)


def test_long_rows_are_split_so_every_round_trains_local_steps(setup, demo_root, tmp_path):
    """Rows of ~40k characters (real speeches run together): each round takes exactly
    local_steps batches, ends inside a row, and the next round continues at the next token;
    the rounds' tokens, in order, are every row's tokens and separator exactly once."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tokenizer = setup[0]
    texts = pq.read_table(demo_root / "data" / "demo" / "speeches" / "1800s.parquet")
    paragraphs = texts.column("text").to_pylist()
    rows = ["\n".join(paragraphs[i * 60:(i + 1) * 60])[:40_000] for i in range(2)]
    site = tmp_path / "books"
    site.mkdir()
    pq.write_table(pa.table({"text": rows}), site / "books.parquet")
    tokenizer_ids = [[*tokenizer(t, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
                     for t in rows]
    worker = make_worker(setup, demo_root, tmp_path, replay_ratio=0.0, local_steps=4,
                         batch_size=2, seq_len=128)
    worker.reader.site = SiteConfig("books", str(site))
    cursor, stream, steps, ranges = Cursor(), [], [], []
    for round_index in range(1, 200):
        update = worker.train_round(task(worker, round_index, cursor), setup[2])
        if isinstance(update, NoData):
            break
        worker.commit(round_index=round_index)
        steps.append(update.metrics["steps"])
        ranges.extend(update.consumed)
        ids, lengths = update.sequences.column("input_ids"), update.sequences.column("length")
        stream += [t for seq, n in zip(ids.to_pylist(), lengths.to_pylist()) for t in seq[:n]]
        cursor = update.cursor
    assert stream == tokenizer_ids[0] + tokenizer_ids[1]
    assert set(steps[:-1]) == {4} and 1 <= steps[-1] <= 4  # only the last round runs short
    assert len(steps) == -(-len(stream) // (4 * 2 * 128))
    assert any(r.start_token for r in ranges) and any(r.end_token for r in ranges)


def test_a_worker_listens_on_loopback_only(setup, demo_root, tmp_path):
    """A worker's process-group store (a world of one) is reachable from this machine only."""
    import psutil

    make_worker(setup, demo_root, tmp_path)
    port = int(os.environ["MASTER_PORT"])  # the store of this process's group
    listening = [c.laddr for c in psutil.Process().net_connections(kind="tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    assert listening and all(a.ip in ("127.0.0.1", "::ffff:127.0.0.1") for a in listening), \
        listening
