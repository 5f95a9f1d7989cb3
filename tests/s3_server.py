"""A real S3-compatible server on 127.0.0.1 for the object-store tests: moto in server mode,
reached through a TCP relay the tests can take down and bring back (the endpoint's port
closes and its open connections are reset, as when a server or its load balancer restarts),
while moto keeps the bucket's objects."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.fs as pafs

from tests.helpers import free_port

# Every client in the tests (the test process and, through it, the Ray workers) reads these.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "tributary-test", "AWS_SECRET_ACCESS_KEY": "tributary-test",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


class Relay:
    """Forwards 127.0.0.1:port to the server; `down()` closes the port and resets every open
    connection, `up()` opens it again."""

    def __init__(self, target: int) -> None:
        self.target, self.port = target, free_port()
        self.listener: socket.socket | None = None
        self.open: list[socket.socket] = []
        self.lock = threading.Lock()
        self.up()

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        listener, self.listener = self.listener, None
        if listener is not None:
            listener.close()
        with self.lock:
            for sock in self.open:
                _close(sock, reset=True)
            self.open.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by down()
            try:
                server = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                _close(client, reset=True)
                continue
            with self.lock:
                self.open += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=_pump, args=(a, b), daemon=True).start()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(1 << 16):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        _close(sink, reset=False)


def _close(sock: socket.socket, *, reset: bool) -> None:
    try:
        if reset:  # RST instead of FIN: the peer sees "connection reset"
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()
    except OSError:
        pass


class S3Server:
    """moto_server on its own port, the relay in front; `uri(bucket/path)` names an object
    there as pyarrow's S3 filesystem takes it."""

    def __init__(self, log: Path) -> None:
        self.server_port = free_port()
        moto = Path(sys.executable).with_name("moto_server")
        self.process = subprocess.Popen(
            [str(moto), "-H", "127.0.0.1", "-p", str(self.server_port)],
            stdout=open(log, "w"), stderr=subprocess.STDOUT)  # noqa: SIM115 - lives with the server
        self._wait_ready()
        self.relay = Relay(self.server_port)

    def _wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.process.returncode}")
            try:
                socket.create_connection(("127.0.0.1", self.server_port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError("moto_server did not start")

    def query(self) -> str:
        return f"endpoint_override=127.0.0.1:{self.relay.port}&scheme=http&region=us-east-1"

    def uri(self, path: str, *, userinfo: str = "") -> str:
        return f"s3://{userinfo}{path}?{self.query()}"

    def filesystem(self) -> pafs.S3FileSystem:
        return pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{self.server_port}",
                                 scheme="http", region="us-east-1",
                                 access_key=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                                 secret_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                                 allow_bucket_creation=True)

    def stop(self) -> None:
        self.relay.down()
        self.process.terminate()
        self.process.wait(timeout=30)
