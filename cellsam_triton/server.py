"""Embedded tritonserver: the real server shipped in the `nvidia-pytriton` wheel, run as a child process.

`EmbeddedServer` prepares a runtime folder once (server binary, Python backend and the stub that
matches this interpreter), launches `tritonserver` on loopback ports, waits for readiness and turns
every start-up failure (port taken, empty repository, model that fails to load, early exit) into a
one-line `ServerError`. The module is also the `cellsam-triton serve` subcommand.

Security defaults: loopback addresses, model control mode NONE (no repository API that could load
code), optional gRPC TLS (`TlsConfig`) and an optional admin key (`admin_key`) that Triton's
restricted-protocol options demand on the administrative endpoints; inference stays open.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.metadata
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .errors import ServerError, UserError

log = logging.getLogger(__name__)

PY_TAG = f"{sys.version_info.major}.{sys.version_info.minor}"
# Python backend shared memory per model instance: room for a 1024x1024x3 FP32 image (12 MB)
# and a chunk of 256x256 masks without a growth step on every request.
SHM_DEFAULT_BYTES = 32 * 1024 * 1024  # also the growth step
SHM_DIR = Path("/dev/shm")
PR_SET_PDEATHSIG = 1
DEFAULT_START_TIMEOUT_S = 300.0  # ViT-B sessions take a while to build on a small CPU
_FAILED_LOAD = re.compile(r"failed to load '([^']+)'[^:]*:\s*(.*)")
# Endpoints an admin key protects. Health, metadata, inference and model-config stay open: clients
# read the pipeline's family from its config.
ADMIN_PROTOCOLS = ("model-repository", "shared-memory", "statistics", "trace", "logging")
ADMIN_HEADER = "cellsam-admin-key"  # HTTP header name
ADMIN_GRPC_HEADER = f"triton-grpc-protocol-{ADMIN_HEADER}"  # gRPC metadata key (Triton adds the prefix)
_ADMIN_KEY = re.compile(r"^[A-Za-z0-9._~+/-]{16,256}$")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
_BIND_ERROR = re.compile(r"(already in use|Address already in use|failed to (start|bind)[^\n]*)", re.I)


# --- locating and preparing the server ---------------------------------------------------------
def _wheel_dirs() -> tuple[Path, Path]:
    """(pytriton/tritonserver, nvidia_pytriton.libs) of the installed wheel."""
    try:
        import pytriton
    except ImportError:
        raise ServerError("nvidia-pytriton is not installed; install the server extra: pip install 'cellsam-triton[server]'") from None
    package = Path(pytriton.__file__).resolve().parent
    server, libs = package / "tritonserver", package.parent / "nvidia_pytriton.libs"
    if not (server / "bin" / "tritonserver").is_file():
        raise ServerError(f"no tritonserver binary in {server}; reinstall nvidia-pytriton")
    return server, libs


def runtime_dir() -> Path:
    """Where the prepared server lives: $CELLSAM_TRITON_HOME (default ~/.cache/cellsam-triton)/tritonserver-<ver>-py3.X."""
    home = Path(os.environ.get("CELLSAM_TRITON_HOME") or Path.home() / ".cache" / "cellsam-triton")
    version = importlib.metadata.version("nvidia-pytriton")
    return home / f"tritonserver-{version}-py{PY_TAG}"


def prepare_runtime() -> Path:
    """Copy the wheel's server and put this interpreter's backend stub in place (once, atomically)."""
    target = runtime_dir()
    if (target / ".complete").is_file():
        return target
    source, _ = _wheel_dirs()
    stub = source / "python_backend_stubs" / PY_TAG / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"nvidia-pytriton has no Python backend stub for Python {PY_TAG} ({stub})")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        shutil.copytree(source, staging / "server", ignore=shutil.ignore_patterns("python_backend_stubs", "__pycache__"))
        shutil.copy2(stub, staging / "server" / "backends" / "python" / stub.name)
        (staging / "server" / ".complete").write_text(f"python {PY_TAG}\n")
        try:
            os.rename(staging / "server", target)
        except OSError:  # another process prepared it first
            if not (target / ".complete").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def repository_models(repository: Path) -> list[str]:
    """Names of the model folders (those holding a config.pbtxt) in a repository."""
    return sorted(p.name for p in repository.iterdir() if (p / "config.pbtxt").is_file()) if repository.is_dir() else []


# --- security options ------------------------------------------------------------------------------
@dataclass(frozen=True)
class TlsConfig:
    """gRPC TLS: server certificate and key (PEM files); ``root_ca`` turns on mutual TLS (client certificates)."""

    cert: Path
    key: Path
    root_ca: Path | None = None

    def check(self) -> None:
        for what, path in (("certificate", self.cert), ("key", self.key), ("CA certificate", self.root_ca)):
            if path is not None and not Path(path).is_file():
                raise UserError(f"TLS {what} not found: {path}")

    def args(self) -> list[str]:
        args = ["--grpc-use-ssl=true", f"--grpc-server-cert={Path(self.cert).resolve()}", f"--grpc-server-key={Path(self.key).resolve()}"]
        if self.root_ca is not None:
            args += [f"--grpc-root-cert={Path(self.root_ca).resolve()}", "--grpc-use-ssl-mutual=true"]
        return args


def read_admin_key(path: str | os.PathLike) -> str:
    """The admin key in a file (first line, stripped): 16-256 characters of [A-Za-z0-9._~+/-]."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise UserError(f"cannot read admin key file {path}: {exc.strerror or exc}") from None
    key = lines[0].strip() if lines else ""
    check_admin_key(key, f"admin key in {path}")
    return key


def check_admin_key(key: str, what: str = "admin key") -> None:
    """Refuse keys Triton's option syntax or an HTTP header could not carry (the key is never shown)."""
    if not _ADMIN_KEY.match(key):
        raise UserError(f"{what} must be 16-256 characters of letters, digits and ._~+/-")


def admin_args(key: str) -> list[str]:
    """tritonserver options that demand the key on the admin endpoints: HTTP header ``ADMIN_HEADER``, gRPC ``ADMIN_GRPC_HEADER``."""
    apis = ",".join(ADMIN_PROTOCOLS)
    return [f"--grpc-restricted-protocol={apis}:{ADMIN_HEADER}={key}", f"--http-restricted-api={apis}:{ADMIN_HEADER}={key}"]


# --- the command line ------------------------------------------------------------------------------
def tritonserver_args(
    repository: str | os.PathLike,
    host: str,
    ports: dict[str, int],
    exit_timeout_s: int,
    shm_prefix: str,
    log_verbose: int = 0,
    gpu_metrics: bool = False,
    shm_bytes: int = SHM_DEFAULT_BYTES,
) -> list[str]:
    """The tritonserver options (after the binary) of every way this project runs it: the embedded
    server (``serve``, tests, benchmarks) and the container (``docker/entrypoint.sh`` execs
    tritonserver with what ``serve --print-args`` prints). No model-control API, strict readiness,
    metrics on, Python-backend shared memory sized and named (``shm_prefix``) so that a stop can
    remove what a killed stub leaves in /dev/shm."""
    return [
        f"--model-repository={repository}",
        "--model-control-mode=none",
        "--strict-readiness=true",
        f"--http-address={host}",
        f"--http-port={ports['http']}",
        f"--grpc-address={host}",
        f"--grpc-port={ports['grpc']}",
        "--allow-metrics=true",
        f"--allow-gpu-metrics={'true' if gpu_metrics else 'false'}",
        f"--metrics-address={host}",
        f"--metrics-port={ports['metrics']}",
        f"--exit-timeout-secs={exit_timeout_s}",
        f"--log-verbose={log_verbose}",
        f"--backend-config=python,shm-default-byte-size={shm_bytes}",
        f"--backend-config=python,shm-growth-byte-size={shm_bytes}",
        f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
    ]


# --- the server process --------------------------------------------------------------------------
class EmbeddedServer:
    """A tritonserver child process on a model repository; use as a context manager.

    Ports given as 0 or None are chosen free. ``start`` returns once ``/v2/health/ready`` is true
    (strict readiness: every model loaded) and raises ``ServerError`` with one line otherwise.
    """

    def __init__(
        self,
        repository: str | os.PathLike,
        host: str = "127.0.0.1",
        grpc_port: int | None = 0,
        http_port: int | None = 0,
        metrics_port: int | None = 0,
        log_path: str | os.PathLike | None = None,
        exit_timeout_s: int = 5,
        extra_args: tuple[str, ...] | list[str] = (),
        log_verbose: int = 0,
        tls: TlsConfig | None = None,
        admin_key: str | None = None,
        shm_bytes: int = SHM_DEFAULT_BYTES,
    ) -> None:
        self.repository = Path(repository).resolve()
        self.shm_bytes = int(shm_bytes)
        self.host = host
        self._requested = {"grpc": grpc_port, "http": http_port, "metrics": metrics_port}
        self.ports: dict[str, int] = {}
        self.log_path = Path(log_path) if log_path else None
        self.exit_timeout_s = int(exit_timeout_s)
        self.extra_args = tuple(extra_args)
        self.log_verbose = int(log_verbose)
        if tls is not None:
            tls.check()
        if admin_key is not None:
            check_admin_key(admin_key)
        self.tls = tls
        self._admin_key = admin_key
        self.models: list[str] = []
        # Python-backend shared-memory regions (/dev/shm) get this server's own name prefix, so
        # that stop() can remove what a killed server or stub leaves behind (32 MB each).
        self.shm_prefix = f"cellsam_triton_{os.getpid()}_{os.urandom(4).hex()}_"
        self._process: subprocess.Popen | None = None
        self._lock = threading.Lock()

    # urls ------------------------------------------------------------------------------------
    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.ports['grpc']}"

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.ports['http']}"

    @property
    def metrics_url(self) -> str:
        return f"{self.host}:{self.ports['metrics']}"

    @property
    def pid(self) -> int | None:
        """Process id of the running tritonserver (its process group holds the backend stubs)."""
        return self._process.pid if self.running else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # lifecycle -------------------------------------------------------------------------------
    def command(self, runtime: Path) -> list[str]:
        """The tritonserver command line."""
        return [
            str(runtime / "bin" / "tritonserver"),
            f"--backend-directory={runtime / 'backends'}",
            *tritonserver_args(self.repository, self.host, self.ports, self.exit_timeout_s, self.shm_prefix,
                               self.log_verbose, shm_bytes=self.shm_bytes),
            *(self.tls.args() if self.tls else []),
            *(admin_args(self._admin_key) if self._admin_key else []),
            *self.extra_args,
        ]

    def _environment(self) -> dict[str, str]:
        _, libs = _wheel_dirs()
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(libs), env.get("LD_LIBRARY_PATH", "")) if p)
        # The backend stub runs models with the first `python3` environment on PATH: this venv's.
        env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
        return env

    def _assign_ports(self) -> None:
        taken: set[int] = set()
        for name, port in self._requested.items():
            if port:
                if port_in_use(self.host, port):
                    raise ServerError(f"{name} port {self.host}:{port} is already in use; pick another with --{name}-port")
            else:
                port = free_port(self.host)
                while port in taken:
                    port = free_port(self.host)
            taken.add(port)
            self.ports[name] = port

    def start(self, timeout_s: float = DEFAULT_START_TIMEOUT_S, retry_crash: bool = True) -> "EmbeddedServer":
        """Launch the server and wait (bounded) until every model is ready.

        A server killed by a signal during start-up (a crash, e.g. gRPC's rare "epoll_wait: Bad
        file descriptor" abort seen once in CI) is started once more; errors it reports itself
        (bad model, port taken) are not retried.
        """
        with self._lock:
            if self.running:
                return self
            self.models = repository_models(self.repository)
            if not self.models:
                raise ServerError(f"no models in repository {self.repository} (no <name>/config.pbtxt); run `cellsam-triton export` first")
            self._assign_ports()
            runtime = prepare_runtime()
            if self.log_path is None:
                fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
                os.close(fd)
                self.log_path = Path(name)
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "wb") as log_file:
                self._process = subprocess.Popen(
                    self.command(runtime), stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env=self._environment(), preexec_fn=_session_tied_to_parent(),
                )
            log.debug("tritonserver pid %d, log %s", self._process.pid, self.log_path)
        try:
            self._wait_ready(timeout_s)
        except _StartupCrash as exc:
            self.stop()
            if not retry_crash:
                raise
            log.warning("%s; starting it once more", exc)
            return self.start(timeout_s, retry_crash=False)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        """Until HTTP readiness answers 200 and the metrics port accepts connections (Triton opens
        the metrics endpoint after the HTTP one, so readiness alone can come first)."""
        url = f"http://{self.http_url}/v2/health/ready"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            problem = self._log_problem()
            if problem:
                raise ServerError(f"{problem} (log: {self.log_path})")
            if self._process.poll() is not None:
                error = _StartupCrash if self._process.returncode < 0 else ServerError
                raise error(f"tritonserver exited with code {self._process.returncode} during start-up: {self.last_error_line()} (log: {self.log_path})")
            try:
                with urllib.request.urlopen(url, timeout=1.0) as response:
                    ready = response.status == 200
                if ready:
                    socket.create_connection((self.host, self.ports["metrics"]), timeout=1.0).close()
                    return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise ServerError(f"tritonserver not ready after {timeout_s:.0f} s: {self.last_error_line()} (log: {self.log_path})")

    def _log_text(self) -> str:
        """The server log, with the admin key (should Triton ever echo it) masked."""
        try:
            text = self.log_path.read_text(errors="replace") if self.log_path else ""
        except OSError:
            return ""
        return text.replace(self._admin_key, "***") if self._admin_key else text

    def _log_problem(self) -> str | None:
        """A one-line reason from the log when a model failed to load or a port could not be bound."""
        text = self._log_text()
        failed = _FAILED_LOAD.search(text)
        if failed:
            reason = failed.group(2).split("\\n")[0].strip().rstrip('"').strip()
            return f"model '{failed.group(1)}' failed to load: {reason}"
        for line in text.splitlines():
            if _BIND_ERROR.search(line) and ("port" in line.lower() or "socket" in line.lower() or "address" in line.lower()):
                return f"tritonserver could not bind a port: {_strip_log_prefix(line)}"
        return None

    def last_error_line(self) -> str:
        lines = [_strip_log_prefix(x) for x in self._log_text().splitlines() if x.strip()]
        errors = [x for x in lines if "error" in x.lower() or "failed" in x.lower()]
        return (errors or lines or ["(empty log)"])[-1]

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after a bounded wait; always reaps the process."""
        with self._lock:
            process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            try:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(process)
                process.wait(timeout=10)
        # the backend stubs live in the server's session; none may outlive it
        _kill_group(process)
        self.remove_shm_regions()

    def shm_regions(self) -> list[Path]:
        """The Python-backend shared-memory files of this server now present."""
        return sorted(SHM_DIR.glob(f"{self.shm_prefix}*")) if SHM_DIR.is_dir() else []

    def remove_shm_regions(self) -> None:
        """Delete this server's shared-memory files (only call once its processes are gone)."""
        for path in self.shm_regions():
            try:
                path.unlink()
            except OSError as exc:
                log.warning("could not remove %s: %s", path, exc)

    def restart(self, timeout_s: float = DEFAULT_START_TIMEOUT_S) -> "EmbeddedServer":
        """Stop and start again on the same ports."""
        self.stop()
        self._requested = dict(self.ports) or self._requested
        return self.start(timeout_s)

    def __enter__(self) -> "EmbeddedServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _StartupCrash(ServerError):
    """tritonserver died from a signal before it was ready."""


def _session_tied_to_parent():
    """preexec_fn: own process group (stubs included) that gets SIGTERM if this process dies.

    The parent-death signal follows the forking *thread*, so it is only armed from the main thread.
    """
    arm = threading.current_thread() is threading.main_thread() and sys.platform.startswith("linux")

    def setup() -> None:
        os.setsid()
        if arm:
            try:
                ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
            except OSError:
                pass

    return setup


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _strip_log_prefix(line: str) -> str:
    """Drop Triton's 'E1122 05:10:00.123 123 file.cc:45] ' prefix."""
    return re.sub(r"^[IWE]\d{4} [\d:.]+ +\d+ [^\]]+\] ", "", line.strip()).strip('" ')


# --- `cellsam-triton serve` ------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repository", required=True, type=Path, metavar="DIR", help="Triton model repository")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    parser.add_argument("--grpc-port", type=int, default=8001, help="default %(default)s")
    parser.add_argument("--http-port", type=int, default=8000, help="default %(default)s")
    parser.add_argument("--metrics-port", type=int, default=8002, help="default %(default)s")
    parser.add_argument("--log-file", type=Path, default=None, metavar="PATH", help="server log (default: a temp file)")
    parser.add_argument("--log-verbose", type=int, default=0, metavar="N", help="tritonserver log verbosity (default 0)")
    parser.add_argument("--start-timeout", type=float, default=600.0, help="seconds to wait for readiness (default %(default)s)")
    parser.add_argument("--exit-timeout", type=int, default=5, metavar="S", help="seconds in-flight requests get on stop (default %(default)s)")
    parser.add_argument("--gpu-metrics", action="store_true", help="also export GPU metrics (needs a GPU)")
    parser.add_argument("--shm-mib", type=int, default=SHM_DEFAULT_BYTES >> 20, metavar="MIB",
                        help="Python-backend shared memory per model instance and growth step (default %(default)s)")
    parser.add_argument("--print-args", action="store_true",
                        help="print the tritonserver options these settings give, one per line, and exit (the container's "
                             "entrypoint runs its own tritonserver with them)")
    parser.add_argument("--tls-cert", type=Path, metavar="PEM", help="serve gRPC over TLS with this server certificate (needs --tls-key)")
    parser.add_argument("--tls-key", type=Path, metavar="PEM", help="private key of --tls-cert")
    parser.add_argument("--tls-ca", type=Path, metavar="PEM", help="also demand client certificates signed by this CA (mutual TLS)")
    parser.add_argument(
        "--admin-key-file", type=Path, metavar="PATH",
        help=f"protect the admin endpoints ({', '.join(ADMIN_PROTOCOLS)}) with the key in this file; "
             f"callers send it in the HTTP header '{ADMIN_HEADER}' or gRPC metadata '{ADMIN_GRPC_HEADER}'; "
             "inference, health, metadata and model config stay open",
    )


def tls_config(args: argparse.Namespace) -> TlsConfig | None:
    """The TlsConfig the serve options ask for (None: plain gRPC)."""
    if args.tls_cert is None and args.tls_key is None:
        if args.tls_ca is not None:
            raise UserError("--tls-ca needs --tls-cert and --tls-key")
        return None
    if args.tls_cert is None or args.tls_key is None:
        raise UserError("--tls-cert and --tls-key go together")
    return TlsConfig(args.tls_cert, args.tls_key, args.tls_ca)


CONTAINER_SHM_PREFIX = "cellsam_triton_"


def run(args: argparse.Namespace) -> int:
    if args.shm_mib < 1 or args.exit_timeout < 0:
        raise UserError("--shm-mib must be at least 1 and --exit-timeout at least 0")
    tls = tls_config(args)
    admin_key = read_admin_key(args.admin_key_file) if args.admin_key_file is not None else None
    if args.print_args:  # the repository may not exist yet (a container exports it first)
        ports = {"grpc": args.grpc_port, "http": args.http_port, "metrics": args.metrics_port}
        lines = tritonserver_args(args.repository, args.host, ports, args.exit_timeout, CONTAINER_SHM_PREFIX,
                                  args.log_verbose, args.gpu_metrics, args.shm_mib << 20)
        lines += (tls.args() if tls else []) + (admin_args(admin_key) if admin_key else [])
        print("\n".join(lines))
        return 0
    if not args.repository.is_dir():
        raise UserError(f"repository not found: {args.repository}")
    if args.host not in LOOPBACK_HOSTS:
        log.warning("serving on %s: reachable from other machines%s; HTTP and metrics are never encrypted",
                    args.host, "" if tls else " over plain gRPC (add --tls-cert/--tls-key)")
    server = EmbeddedServer(
        args.repository, host=args.host, grpc_port=args.grpc_port, http_port=args.http_port,
        metrics_port=args.metrics_port, log_path=args.log_file, log_verbose=args.log_verbose,
        tls=tls, admin_key=admin_key, exit_timeout_s=args.exit_timeout, shm_bytes=args.shm_mib << 20,
    )
    stop, ready = threading.Event(), threading.Event()

    def on_signal(*_: object) -> None:
        if not ready.is_set():  # still starting: abort the start (the server is stopped below)
            raise KeyboardInterrupt
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start(args.start_timeout)
        ready.set()
        print(
            f"cellsam-triton serve: ready grpc={server.grpc_url} http={server.http_url} "
            f"metrics={server.metrics_url} models={','.join(server.models)}"
            f"{' tls=on' if tls else ''}{' admin-key=on' if admin_key else ''}",
            flush=True,
        )
        while not stop.wait(0.5):
            if not server.running:
                raise ServerError(f"tritonserver exited unexpectedly: {server.last_error_line()} (log: {server.log_path})")
        return 0
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
