"""lusai as a cluster of hosts on one machine, with hosts that fail.

Every process of a production deployment runs on a host of its own: a network namespace with its
own address, its own hostname (UTS namespace) and one veth link to a private bridge that reaches
nothing outside this machine. PostgreSQL and Redis run on the ``db`` host and are reached over
those links; the result destination (DCMTK ``storescp``) is the ``pacs`` host; the test driver
sends from the bridge's address, as a PACS routing rule would.

    db    10.77.0.10   PostgreSQL (own cluster, initdb'd for the run) and Redis
    scp   10.77.0.11   lusai scp
    api   10.77.0.12   lusai api (/health, /metrics read during the run)
    w1-3  10.77.0.21-23  lusai worker (analyze and deliver queues)
    pacs  10.77.0.30   storescp

The hosts share one filesystem: ``LUSAI_STORAGE_ROOT`` stands for the shared (NFS/RWX) volume of a
real cluster (``service/core/storage.py`` says what lusai needs from it).

A baseline burst of cines is analysed with no fault. Then a second burst, during which:

* ``link_cut``: the link of a worker that is running a job goes down (no RST, no FIN: a cable
  pulled or a host powered off) and comes back after ``--cut-seconds``;
* ``worker_kill``: another worker that is running a job is killed (kill -9 of its process group);
* ``redis_restart``: Redis is restarted without persistence (every queued message is lost).

Then the books (``bench/chaos/faults.py``'s): every cine the SCP accepted has exactly one
instance, one succeeded job and one result, and each of its outputs arrived at the PACS exactly
once. For each fault, the time it cost: from the fault to the moment the jobs it hit were done.

    sudo .venv/bin/python bench/multihost.py --out bench/results/multihost.json

Needs root (``ip netns``, ``unshare``), iproute2, PostgreSQL's server binaries, redis-server and
DCMTK. Exit status 1 when anything was lost or duplicated or the faults did not take place.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import pydicom  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402

from bench.chaos.faults import Cines, books, c_store, wait_until  # noqa: E402

NET = "10.77.0"
BRIDGE = "lusai-br0"
HOSTS = {"db": 10, "scp": 11, "api": 12, "w1": 21, "w2": 22, "w3": 23, "pacs": 30}
WORKERS = ("w1", "w2", "w3")
PREFIX = "lusai-"  # network namespace names
PG_BIN = Path("/usr/lib/postgresql")


def ip(host: str) -> str:
    return f"{NET}.{HOSTS[host]}"


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=30)


# --- the network -----------------------------------------------------------------------------------


class Network:
    """One bridge, one namespace per host, one veth pair each; torn down by :meth:`down`."""

    def up(self) -> None:
        self.down()  # leftovers of an interrupted run
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "addr", "add", f"{NET}.1/24", "dev", BRIDGE)
        sh("ip", "link", "set", BRIDGE, "up")
        for host in HOSTS:
            ns = PREFIX + host
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", self.link(host), "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "link", "set", self.link(host), "master", BRIDGE, "up")
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{ip(host)}/24", "dev", "eth0")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")

    @staticmethod
    def link(host: str) -> str:
        return f"lh-{host}"  # the host's cable, on the bridge side

    def cut(self, host: str) -> None:
        sh("ip", "link", "set", self.link(host), "down")

    def restore(self, host: str) -> None:
        sh("ip", "link", "set", self.link(host), "up")

    def down(self) -> None:
        for host in HOSTS:
            sh("ip", "netns", "del", PREFIX + host, check=False)
            sh("ip", "link", "del", self.link(host), check=False)
        sh("ip", "link", "del", BRIDGE, check=False)

    def command(self, host: str, argv: list[str], user: str | None = None) -> list[str]:
        """``argv`` on ``host``: its network namespace, and a UTS namespace named after it."""
        run = ["runuser", "-u", user, "--", *argv] if user else argv
        script = f'hostname {host} && exec "$@"'
        return ["ip", "netns", "exec", PREFIX + host, "unshare", "--uts", "sh", "-c", script, "sh", *run]


# --- the cluster -----------------------------------------------------------------------------------


@dataclass
class Cluster:
    work: Path
    net: Network = field(default_factory=Network)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.pacs_dir = self.work / "pacs"
        self.db_url = f"postgresql+psycopg2://postgres@{ip('db')}:5432/lusai"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("LUSAI_")} | {
            "LUSAI_DATA_DIR": str(self.work / "data"),
            "LUSAI_DATABASE_URL": self.db_url,
            "LUSAI_BROKER_URL": f"redis://{ip('db')}:6379/0",
            "LUSAI_DICOM_HOST": "0.0.0.0",
            "LUSAI_API_HOST": "0.0.0.0",
            "LUSAI_ALLOWED_CALLING_AES": "SCANNER",
            "LUSAI_DEFAULT_DESTINATION": f"PACS@{ip('pacs')}:11113",
            "LUSAI_LOG_FORMAT": "json",
            "LUSAI_RECOVERY_INTERVAL": "2",
            "LUSAI_HEARTBEAT_INTERVAL": "2",
            "LUSAI_WORKER_LOST_AFTER": "10",
            "LUSAI_STALE_JOB_AFTER": "120",  # the backstop; a lost worker is found by its heartbeat
            "LUSAI_WORKER_CONCURRENCY": "1",
            "LUSAI_DELIVER_CONCURRENCY": "1",
        }
        self.port = 11112

    # lifecycle
    def start(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        self.work.chmod(0o755)
        self.pacs_dir.mkdir()
        self.net.up()
        self._postgres()
        self._redis()
        self.start_proc(
            "pacs",
            self.net.command(
                "pacs", [self._storescp(), "-aet", "PACS", "+xa", "-uf", "-od", str(self.pacs_dir), "11113"]
            ),
        )
        subprocess.run(
            [sys.executable, "-m", "service", "db", "upgrade"],
            env=self.env,
            check=True,
            timeout=180,
            capture_output=True,
        )
        self.start_lusai("scp", ["scp"])
        self.start_lusai("api", ["api"])
        for w in WORKERS:
            self.start_lusai(w, ["worker"])
        self.wait_scp()

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
        for p in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=20)
        self.net.down()

    # processes
    def start_proc(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.work / f"{name}.log", "ab")  # noqa: SIM115  (the child keeps writing to it)
        p = subprocess.Popen(argv, stdout=log, stderr=log, env=self.env, start_new_session=True)
        self.procs[name] = p
        return p

    def start_lusai(self, host: str, args: list[str]) -> subprocess.Popen[bytes]:
        return self.start_proc(host, self.net.command(host, [sys.executable, "-m", "service", *args]))

    def kill(self, name: str) -> None:
        os.killpg(self.procs[name].pid, signal.SIGKILL)
        self.procs[name].wait(timeout=20)

    def _storescp(self) -> str:
        exe = shutil.which("storescp")
        assert exe, "DCMTK storescp is needed"
        return exe

    def _postgres(self) -> None:
        versions = sorted(PG_BIN.glob("*/bin/postgres"))
        assert versions, "PostgreSQL's server binaries are needed (/usr/lib/postgresql/*/bin)"
        bin_dir = versions[-1].parent
        data, sock = self.work / "pg", self.work / "pgsock"
        for d in (data, sock):
            d.mkdir()
            shutil.chown(d, "postgres", "postgres")
        sh(
            "runuser",
            "-u",
            "postgres",
            "--",
            str(bin_dir / "initdb"),
            "-D",
            str(data),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        )
        with open(data / "pg_hba.conf", "a") as hba:
            hba.write(f"host all all {NET}.0/24 trust\n")
        argv = [
            str(bin_dir / "postgres"),
            "-D",
            str(data),
            "-c",
            f"listen_addresses={ip('db')}",
            "-c",
            f"unix_socket_directories={sock}",
            "-c",
            "max_connections=300",
            "-c",
            "fsync=off",
        ]
        self.start_proc("postgres", self.net.command("db", argv, user="postgres"))
        admin = create_engine(
            f"postgresql+psycopg2://postgres@{ip('db')}:5432/postgres", isolation_level="AUTOCOMMIT"
        )
        assert wait_until(lambda: admin.connect().close() is None, 30, 0.3), self.logs()
        with admin.connect() as c:
            c.execute(text("CREATE DATABASE lusai"))
        admin.dispose()
        self.engine = create_engine(self.db_url, pool_pre_ping=True)

    def _redis(self) -> None:
        argv = [
            "redis-server",
            "--bind",
            ip("db"),
            "--port",
            "6379",
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
            "--dir",
            str(self.work),
        ]
        self.start_proc("redis", self.net.command("db", argv))
        assert wait_until(lambda: sh("redis-cli", "-h", ip("db"), "ping").stdout.strip() == "PONG", 30, 0.2)

    def restart_redis(self) -> None:
        self.kill("redis")
        self._redis()

    def wait_scp(self, timeout: float = 120) -> None:
        import socket

        def up() -> bool:
            with socket.socket() as s:
                s.settimeout(1)
                return s.connect_ex((ip("scp"), self.port)) == 0

        assert wait_until(up, timeout, 0.3), "SCP did not start\n" + self.logs()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n" + p.read_text()[-2000:] for p in sorted(self.work.glob("*.log")))

    # what books() and the driver read
    @property
    def pacs_port(self) -> int:
        return 11113

    def rows(self, sql: str, **params: Any) -> list[Any]:
        with self.engine.connect() as c:
            return list(c.execute(text(sql), params).all())

    def running_on(self, host: str) -> list[int]:
        """Jobs RUNNING on a worker of ``host`` (``jobs.worker`` is hostname:pid)."""
        return [
            r[0]
            for r in self.rows(
                "SELECT id FROM jobs WHERE state = 'running' AND worker LIKE :w", w=f"{host}:%"
            )
        ]

    def done(self, job_ids: list[int]) -> bool:
        if not job_ids:
            return True
        rows = self.rows(
            "SELECT count(*) FROM jobs j JOIN results r ON r.job_id = j.id "
            "WHERE j.id = ANY(:ids) AND j.state = 'succeeded'",
            ids=job_ids,
        )
        return int(rows[0][0]) == len(job_ids)

    def metrics(self) -> str:
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"http://{ip('api')}:8000/metrics", timeout=5).text
        return ""


# --- the run ---------------------------------------------------------------------------------------


def send(cluster: Cluster, paths: list[Path]) -> dict[str, int]:
    """C-STORE each cine to the SCP host (a failure is re-sent, as PACS routing does)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(p: Path) -> tuple[str, int]:
        uid = str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
        for _ in range(5):
            status = c_store(cluster.port, p, host=ip("scp"))
            if status == 0:
                break
            time.sleep(1)
        return uid, status

    with ThreadPoolExecutor(2) as pool:
        return dict(pool.map(one, paths))


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> float:
    t0 = time.monotonic()
    if not wait_until(cond, timeout, 0.1):
        raise TimeoutError(what)
    return time.monotonic() - t0


def caught_up(cluster: Cluster, accepted: list[str], timeout: float) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        with contextlib.suppress(Exception):
            b = books(cluster, accepted)  # type: ignore[arg-type]
            if b["lost_objects"] == 0 and b["outputs"] >= 2 * len(accepted):
                return time.monotonic() - t0
        time.sleep(0.5)
    return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="lusai-multihost-"))
    cluster = Cluster(work)
    out: dict[str, Any] = {"cines_per_burst": args.cines, "frames": args.frames, "faults": {}}
    try:
        cluster.start()
        cines = Cines(work / "cines")
        (work / "cines").mkdir()
        from pydicom.uid import generate_uid

        # baseline: the same burst with every host up
        paths = cines.burst(args.cines, frames=args.frames)
        t0 = time.monotonic()
        statuses = send(cluster, paths)
        accepted = [u for u, s in statuses.items() if s == 0]
        base = caught_up(cluster, accepted, args.timeout)
        out["baseline"] = {
            "accepted": len(accepted),
            "seconds": round(time.monotonic() - t0, 1),
            "caught_up": base is not None,
        }

        # the faulted burst
        paths = [cines.make(generate_uid(), args.frames) for _ in range(args.cines)]
        t0 = time.monotonic()
        import threading

        sent: dict[str, int] = {}
        sender = threading.Thread(target=lambda: sent.update(send(cluster, paths)))
        sender.start()
        faults = out["faults"]

        # 1. a worker's cable pulled mid-job
        wait_for(lambda: bool(cluster.running_on("w1")), args.timeout, "w1 never ran a job")
        hit1 = cluster.running_on("w1")
        cluster.net.cut("w1")
        cut_at = time.monotonic()
        # 2. another worker killed mid-job
        wait_for(lambda: bool(cluster.running_on("w2")), args.timeout, "w2 never ran a job")
        hit2 = cluster.running_on("w2")
        cluster.kill("w2")
        kill_at = time.monotonic()
        # 3. Redis restarted, losing what it held
        time.sleep(1)
        queued = [r[0] for r in cluster.rows("SELECT id FROM jobs WHERE state IN ('queued', 'retrying')")]
        cluster.restart_redis()
        redis_at = time.monotonic()
        sender.join()
        accepted_2 = [u for u, s in sent.items() if s == 0]

        faults["link_cut"] = {"jobs_hit": len(hit1)}
        faults["worker_kill"] = {"jobs_hit": len(hit2)}
        faults["redis_restart"] = {"jobs_queued": len(queued)}
        for name, hit, at in (
            ("worker_kill", hit2, kill_at),
            ("redis_restart", queued, redis_at),
            ("link_cut", hit1, cut_at),
        ):
            with contextlib.suppress(TimeoutError):
                wait_for(lambda h=hit: cluster.done(h), args.timeout, name)  # type: ignore[misc]
                faults[name]["seconds_to_recover"] = round(time.monotonic() - at, 1)
        # the cable back in: the worker returns to a job another host finished
        remaining = args.cut_seconds - (time.monotonic() - cut_at)
        if remaining > 0:
            time.sleep(remaining)
        cluster.net.restore("w1")
        faults["link_cut"]["link_down_seconds"] = round(time.monotonic() - cut_at, 1)
        everything = accepted + accepted_2
        finished = caught_up(cluster, everything, args.timeout)
        out["faulted"] = {
            "accepted": len(accepted_2),
            "seconds": round(time.monotonic() - t0, 1),
            "caught_up": finished is not None,
        }
        time.sleep(args.settle)  # let the returning worker try to finish its old job
        out["books"] = books(cluster, everything)  # type: ignore[arg-type]
        out["attempts"] = dict(cluster.rows("SELECT attempts, count(*) FROM jobs GROUP BY attempts"))
        metrics = cluster.metrics()
        out["metrics_sample"] = [
            ln for ln in metrics.splitlines() if ln.startswith(("lusai_queue", "lusai_worker"))
        ][:20]
    except (Exception, SystemExit) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["logs"] = cluster.logs()[-6000:]
    finally:
        cluster.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            out["work"] = str(work)
    return out


def verdict(out: dict[str, Any]) -> list[str]:
    """What is wrong with a run, in words; empty when it proves the point."""
    problems = []
    if "error" in out:
        problems.append(out["error"])
        return problems
    b = out["books"]
    if b["lost_objects"] or b["duplicate_results"]:
        problems.append(f"lost {b['lost_objects']}, duplicated {b['duplicate_results']}")
    if b["accepted"] != 2 * out["cines_per_burst"]:
        problems.append(f"the SCP accepted {b['accepted']} of {2 * out['cines_per_burst']} cines")
    for name in ("link_cut", "worker_kill"):
        f = out["faults"][name]
        if not f.get("jobs_hit") or "seconds_to_recover" not in f:
            problems.append(f"{name}: {f}")
    if not out["faulted"]["caught_up"]:
        problems.append("the faulted burst did not catch up")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cines", type=int, default=30, help="cines per burst")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--cut-seconds", type=float, default=30, help="how long the cut link stays down")
    parser.add_argument("--settle", type=float, default=5, help="seconds to wait after the link is back")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("multihost: needs root (ip netns, unshare)", file=sys.stderr)
        return 2
    # a SIGTERM (a timeout, a CI cancel) tears the hosts down like an error does
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    out = run(args)
    out["problems"] = verdict(out)
    text_out = json.dumps(out, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text_out)
    print(text_out)
    return 1 if out["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
