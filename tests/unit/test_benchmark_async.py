"""The async-vs-sync benchmark's configurations and report (its training runs are not part of
the suite: `python benchmarks/async_vs_sync.py --quick`)."""

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("async_vs_sync",
                                              REPO / "benchmarks" / "async_vs_sync.py")
bench = importlib.util.module_from_spec(spec)
sys.modules["async_vs_sync"] = bench
spec.loader.exec_module(bench)


def run(*, wall: float, ppl: float) -> dict:
    return {"wall_s": wall, "tokens_per_s": 1000 / wall, "new_tokens": 1000, "versions": 4,
            "perplexity": {"speeches": ppl, "code": ppl}, "mean_ppl": ppl,
            "forgetting": 0.0, "failures": 0}


def test_ratios_are_taken_pair_by_pair():
    # Paired: 10/5 and 20/20 give 2.0 and 1.0 (median 1.5); medians first would give 1.2.
    results = {"steady/sync": [run(wall=10, ppl=100), run(wall=20, ppl=200)],
               "steady/async": [run(wall=5, ppl=90), run(wall=20, ppl=220)]}
    text = bench.report(results, scenarios=["steady"], eval_every=4)
    ratio = text.splitlines()[-1]
    assert ratio == ("ratio: steady: sync / async wall time 1.50 (1.00–2.00), mean perplexity "
                     "async / sync 1.000 (0.900–1.100)")
    assert "async − sync, paired: mean ± sd +5.0 ± 21.2" in text  # -10 and +20


def test_both_modes_get_the_same_sites_budget_and_model(tmp_path):
    sites = {"slow": tmp_path / "slow", "fast": tmp_path / "fast"}
    demo = tmp_path / "demo"
    for folder in [*sites.values(), demo / "eval"]:
        folder.mkdir(parents=True)
    for name in ("speeches_newest.parquet", "code.jsonl", "shakespeare.txt"):
        (demo / "eval" / name).touch()  # the config checks that they exist; nothing reads them
    configs = {mode: bench.config_for(sites, demo, tmp_path / mode, mode=mode, seed=3,
                                      eval_every=4) for mode in ("sync", "async")}
    sync, asyn = configs["sync"], configs["async"]
    assert (sync.merge.mode, asyn.merge.mode) == ("sync", "async")
    assert [(s.name, s.path, s.worker.local_steps) for s in sync.sites] == [
        (s.name, s.path, s.worker.local_steps) for s in asyn.sites]
    assert {s.name: s.worker.local_steps for s in sync.sites} == {"slow": 64, "fast": 16}
    assert sync.worker == asyn.worker and sync.model == asyn.model
    assert sync.replay == asyn.replay and sync.run.seed == asyn.run.seed == 3
    assert (sync.run.eval_every, asyn.run.eval_every) == (1, 4)  # sync's gate needs every round
