"""Starting a server: `tributary serve RUN_DIR` on its own, or beside training (`run --serve`)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from pathlib import Path

from trainer.serve.options import API_KEY_ENV, ServeOptions, key_digest

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser, *, beside_training: bool) -> None:
    """The serving flags (`run --serve` takes the same, without --version and --address)."""
    if not beside_training:
        parser.add_argument("--version", help="serve this version (e.g. v0003) and stay on it "
                            "(a rollback); default: follow the run's newest accepted version")
        parser.add_argument("--address", help="the Ray cluster to deploy on (default: the "
                            "run's cluster.address, else RAY_ADDRESS, else a local cluster)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="HTTP address (default 127.0.0.1; any other needs an API key)")
    parser.add_argument("--replicas", type=int, default=1, help="model replicas (default 1)")
    parser.add_argument("--api-key", default=None,
                        help=f"a key requests must present as `Authorization: Bearer KEY` "
                        f"(default: the {API_KEY_ENV} environment variable, else none)")
    parser.add_argument("--num-cpus", type=float, default=0 if beside_training else 1,
                        help="CPUs reserved per replica (default %(default)s)")
    parser.add_argument("--num-gpus", type=float, default=0,
                        help="GPUs per replica; > 0 generates on CUDA (default 0)")
    parser.add_argument("--max-tokens", type=int, default=512,
                        help="new tokens per request, at most (default 512)")


def options_from(args: argparse.Namespace, run_dir: str) -> ServeOptions:
    key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if args.replicas < 1 or args.max_tokens < 1 or not 0 < args.port < 65536:
        raise ValueError("--replicas and --max-tokens must be at least 1, --port in 1..65535")
    return ServeOptions(run_dir=str(run_dir), version=getattr(args, "version", None),
                        replicas=args.replicas, host=args.host, port=args.port,
                        api_key_sha256=key_digest(key), num_cpus=args.num_cpus,
                        num_gpus=args.num_gpus, max_tokens=args.max_tokens)


def serve_run_dir(options: ServeOptions, *, address: str | None) -> int:
    """`tributary serve`: deploy, print where, and serve until SIGINT or SIGTERM."""
    import ray
    from ray import serve

    from cluster.connect import connect
    from trainer.config import load_config
    from trainer.serve.app import start_serving
    from trainer.serve.versions import VersionSource

    source = VersionSource(options.run_dir)
    config = load_config(f"{source.shown}/config.yaml", text=source.config_text(),
                         check_files=False)
    name = options.version or source.latest()
    if name is None:
        raise FileNotFoundError(f"{source.shown}: no accepted version yet; start the run "
                                "first, or serve it from `tributary run CONFIG --serve`")
    source.folder(name)  # an unknown, rejected or pruned version: say so before deploying
    started = connect(address=address or config.cluster.address,
                      dashboard_host=config.cluster.dashboard_host,
                      dashboard_port=config.cluster.dashboard_port,
                      include_dashboard=config.cluster.include_dashboard)
    try:
        url = start_serving(options)
        print(f"serving {source.shown} ({'pinned to ' + name if options.version else 'following latest, now ' + name})"
              f" at {url}/v1 — Ctrl-C to stop", flush=True)
        wait_for_signal()
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()
    return 0


def wait_for_signal() -> None:
    """Return on SIGINT or SIGTERM. The handler only appends to a list: setting an Event from a
    handler that interrupted that Event's own wait would take a lock the wait holds."""
    received: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: received.append(signum))
    while not received:
        time.sleep(0.5)


class ServeBesideTraining:
    """`run --serve`: deploys as soon as the run's first version is written (a thread, so
    training is not held up), and serves on after the last round until Ctrl-C."""

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.url: str | None = None
        self.error: Exception | None = None
        self.thread = threading.Thread(target=self._deploy, name="tributary-serve", daemon=True)

    def start(self) -> ServeBesideTraining:
        self.thread.start()
        return self

    def _deploy(self) -> None:
        from trainer.serve.app import start_serving
        from trainer.serve.versions import VersionSource

        source = VersionSource(self.options.run_dir)
        while source.latest() is None:
            time.sleep(0.5)
        try:
            self.url = start_serving(self.options)
            log.info("serving %s at %s/v1 (following each accepted version)",
                     Path(self.options.run_dir).name, self.url)
        except Exception as exc:  # noqa: BLE001 - training goes on; the error is reported
            self.error = exc
            log.error("could not start serving: %s", exc)

    def serve_on(self) -> None:
        """After the run: keep answering with its last version until SIGINT or SIGTERM."""
        self.thread.join()
        if self.url is None:
            raise RuntimeError(f"serving did not start: {self.error}")
        print(f"training done; serving its newest version at {self.url}/v1 — Ctrl-C to stop",
              flush=True)
        wait_for_signal()
