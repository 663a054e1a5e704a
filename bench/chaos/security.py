"""Security checks against running lusai processes, each a PASS/FAIL line with its figures.

    .venv/bin/python bench/chaos/security.py [--quick] [--out chaos-security.json] [--logs DIR ...]

One production deployment (the harness of ``bench/chaos/load.py``: PostgreSQL, Redis, processes
started by ``tests/test_production.py``'s ``Procs``): ``lusai scp`` with an allow-list
(``LUSAI_ALLOWED_CALLING_AES``), a second ``lusai scp`` speaking mutual TLS only
(``LUSAI_DICOM_TLS_CERT/KEY/CA``, certificates made with openssl as the receive tests make them),
``lusai api`` with keys, and ``lusai worker`` (so a real result with stored SEG/SR/previews sits
next to every traversal attempt). ``LUSAI_MAX_OBJECT_BYTES`` is 1 MiB on the SCP and the API.

Checks (each PASS only when every case in it passes):

- ``unknown_calling_ae``: associations from AE titles not on the list are rejected (pynetdicom and
  DCMTK storescu), nothing is stored; the listed AE stores (control).
- ``tls_wrong_client_certificate``: on the TLS port, a client with no certificate, with a
  self-signed certificate the CA did not sign, and plain DICOM are all refused; the right
  certificate stores (control).
- ``api_without_key``: every ``/api/v1`` operation of the running server's OpenAPI document,
  with no key, with a malformed key and with a wrong secret: 401 each.
- ``path_traversal``: every path parameter and every query parameter naming an ID, a UID, a file
  or a cursor, of every operation, with ``../`` sequences (plain, %-encoded, double-encoded,
  backslashes), absolute paths and NUL bytes, sent raw (no client-side normalisation) with an
  admin key: never 5xx, never 200 on a path parameter, never a response carrying another file
  (``/etc/passwd``, the database, the settings); plus an upload whose SOP Instance UID is a
  traversal (refused, nothing written outside storage).
- ``oversize_upload``: a 2 MiB object as application/dicom (with Content-Length, and chunked
  without one) and as multipart: 413, nothing indexed; over DICOM: 0xA700.
- ``phi_in_logs``: every log line of this run's processes (and of ``--logs`` folders, e.g. the
  load and fuzz runs' work folders) scanned for the PHI markers the generated objects carry: 0.

Exit code 1 when any check fails. ``--quick`` runs a subset of the traversal payloads.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import ssl
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.chaos.load import (  # noqa: E402
    CALLING_AE,
    PHI_NAME,
    Deployment,
    deployment,
    phi_hits,
    wait_for_echo,
)

MAX_BYTES = 1 << 20

TRAVERSALS = [
    "../../../../etc/passwd",
    "..%2f..%2f..%2f..%2fetc%2fpasswd",
    "%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "%252e%252e%252fetc%252fpasswd",
    "..%5c..%5c..%5cwindows%5cwin.ini",
    "....//....//etc/passwd",
    "/etc/passwd",
    "%2fetc%2fpasswd",
    "1%00",
    "%00",
    "1.2.3%00.dcm",
    "..",
    "%2e%2e",
    "data%2flusai.db",
]
QUICK_TRAVERSALS = ["../../../../etc/passwd", "%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/etc/passwd", "1%00"]
#: What another file would look like in a response body.
LEAK = re.compile(rb"root:.*:0:0:|SQLite format 3|\[fonts\]|LUSAI_|BEGIN (EC |RSA )?PRIVATE KEY")
#: Query parameters that name a file or an ID (the others are enums, dates and numbers).
ID_QUERY = re.compile(r"(_uid|_id|^cursor|^destination|^reviewer|^principal|^resource_prefix)$")


def check(name: str, ok: bool, **figures: Any) -> dict[str, Any]:
    line = {"check": name, "result": "PASS" if ok else "FAIL", **figures}
    print(f"{line['result']} {name} {json.dumps(figures, default=str)[:400]}", file=sys.stderr)
    return line


# --- DICOM ---------------------------------------------------------------------------------------


def _ae(title: str) -> Any:
    from pydicom.uid import ExplicitVRLittleEndian, UltrasoundMultiFrameImageStorage
    from pynetdicom import AE

    ae = AE(ae_title=title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.add_requested_context(UltrasoundMultiFrameImageStorage, ExplicitVRLittleEndian)
    return ae


def store(port: int, path: Path, title: str, ssl_context: ssl.SSLContext | None = None) -> str:
    """C-STORE one file: its status as 0xNNNN, or why there was none."""
    from pynetdicom import _config

    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        tls = (ssl_context, "127.0.0.1") if ssl_context else None
        assoc = _ae(title).associate("127.0.0.1", port, ae_title="LUSAI", tls_args=tls)
    except (OSError, ssl.SSLError) as exc:
        return f"connection-failed:{type(exc).__name__}"
    if assoc.is_rejected:
        return "association-rejected"
    if not assoc.is_established:
        return "association-aborted" if assoc.is_aborted else "association-failed"
    try:
        rsp = assoc.send_c_store(path)
        return f"0x{int(rsp.Status):04X}" if "Status" in rsp else "no-response"
    finally:
        if assoc.is_established:
            assoc.release()


def instance_count(d: Deployment) -> int:
    from sqlalchemy import text

    engine = d.engine()
    with engine.connect() as c:
        n = int(c.execute(text("SELECT count(*) FROM instances")).scalar_one())
    engine.dispose()
    return n


def make_cine(path: Path, seed: int, frames: int = 4, **kw: Any) -> Path:
    from pydicom.uid import generate_uid

    from tests.factories import cine, save

    ds = cine(
        "raw",
        frames=frames,
        rows=96,
        cols=128,
        seed=seed,
        sop_uid=generate_uid(),
        study_uid=generate_uid(),
        PatientName=PHI_NAME,
        PatientID=f"PHI-SEC-{seed}",
        AccessionNumber=f"PHIACC{seed}",
        **kw,
    )
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return save(ds, path)


def check_calling_ae(d: Deployment, work: Path) -> dict[str, Any]:
    from tests.conftest import which

    before = instance_count(d)
    cases = {}
    for title in ("INTRUDER", "chaosscu", "CHAOSSCU2", "", "*"):
        if title:
            cases[f"pynetdicom:{title}"] = store(d.port, make_cine(work / f"ae-{title}.dcm", 1), title)
    for title in ("INTRUDER", "STORESCU"):
        out = subprocess.run(
            [
                which("storescu"),
                "-v",
                "-aet",
                title,
                "-aec",
                "LUSAI",
                "127.0.0.1",
                str(d.port),
                str(make_cine(work / f"ae-dcmtk-{title}.dcm", 2)),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        text = out.stdout + out.stderr
        cases[f"storescu:{title}"] = (
            "association-rejected:calling-ae-not-recognized"
            if "Calling AE Title Not Recognized" in text
            else f"rc={out.returncode}"
        )
    stored_by_strangers = instance_count(d) - before
    control = store(d.port, make_cine(work / "ae-ok.dcm", 3), CALLING_AE)
    ok = (
        all(v.startswith("association-rejected") for v in cases.values())
        and stored_by_strangers == 0
        and control == "0x0000"
    )
    return check(
        "unknown_calling_ae", ok, refused=cases, stored_by_unknown=stored_by_strangers, listed_ae=control
    )


def make_certs(folder: Path) -> dict[str, Path]:
    """Self-signed server and client certificates (the client's is the SCP's CA), and an intruder's."""
    from tests.conftest import which

    openssl = which("openssl")
    out = {}
    for name in ("server", "client", "intruder"):
        subprocess.run(
            [
                openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                "-nodes", "-days", "1", "-subj", f"/CN={name}", "-addext", "subjectAltName=IP:127.0.0.1",
                "-keyout", str(folder / f"{name}.key"), "-out", str(folder / f"{name}.pem"),
            ],
            check=True,
            capture_output=True,
        )  # fmt: skip
        out[name] = folder / f"{name}.pem"
        out[f"{name}_key"] = folder / f"{name}.key"
    return out


def client_context(certs: dict[str, Path], who: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(certs["server"]))
    ctx.check_hostname = False
    if who:
        ctx.load_cert_chain(str(certs[who]), str(certs[f"{who}_key"]))
    return ctx


def check_tls(d: Deployment, work: Path) -> dict[str, Any]:
    from tests.conftest import free_port

    certs = make_certs(work)
    port = free_port()
    proc = d.start(
        "scp-tls",
        ["scp"],
        LUSAI_DICOM_PORT=str(port),
        LUSAI_DICOM_TLS_CERT=str(certs["server"]),
        LUSAI_DICOM_TLS_KEY=str(certs["server_key"]),
        LUSAI_DICOM_TLS_CA=str(certs["client"]),
    )
    deadline = time.monotonic() + 60
    good = client_context(certs, "client")
    while True:  # wait until it listens: the right certificate gets an echo through
        assoc = _ae(CALLING_AE).associate("127.0.0.1", port, ae_title="LUSAI", tls_args=(good, "127.0.0.1"))
        if assoc.is_established:
            assoc.release()
            break
        if time.monotonic() > deadline or proc.poll() is not None:
            return check("tls_wrong_client_certificate", False, error="TLS SCP did not start")
        time.sleep(0.5)
    before = instance_count(d)
    cases = {
        "no_client_certificate": store(
            port, make_cine(work / "tls-1.dcm", 11), CALLING_AE, client_context(certs, None)
        ),
        "self_signed_not_from_ca": store(
            port, make_cine(work / "tls-2.dcm", 12), CALLING_AE, client_context(certs, "intruder")
        ),
        "plain_dicom_on_tls_port": store(port, make_cine(work / "tls-3.dcm", 13), CALLING_AE),
    }
    stored = instance_count(d) - before
    control = store(port, make_cine(work / "tls-ok.dcm", 14), CALLING_AE, good)
    ok = not any(v.startswith("0x") for v in cases.values()) and stored == 0 and control == "0x0000"
    return check(
        "tls_wrong_client_certificate", ok, refused=cases, stored_by_refused=stored, right_cert=control
    )


# --- REST ----------------------------------------------------------------------------------------


def raw_request(
    port: int,
    method: str,
    target: str,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    chunked: bool = False,
) -> tuple[int, bytes]:
    """One HTTP request with ``target`` sent exactly as written (no normalisation, no re-encoding)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.putrequest(method, target, skip_accept_encoding=True)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        if chunked:
            conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders()
            for i in range(0, len(body or b""), 65536):
                part = (body or b"")[i : i + 65536]
                try:
                    conn.send(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                except OSError:  # the server answered early and closed
                    break
            else:
                conn.send(b"0\r\n\r\n")
        else:
            if body is not None or method in ("POST", "PUT", "PATCH"):
                conn.putheader("Content-Length", str(len(body or b"")))
            conn.endheaders()
            if body:
                with contextlib.suppress(OSError):  # the server answered early and closed
                    conn.send(body)
        resp = conn.getresponse()
        return resp.status, resp.read()
    except (ConnectionError, http.client.HTTPException) as exc:
        return -1, type(exc).__name__.encode()
    finally:
        conn.close()


def wait_api(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"lusai api exited with {proc.returncode}")
        try:
            if raw_request(port, "GET", "/health/live")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError("API did not answer")


def create_key(d: Deployment, *scopes: str) -> str:
    args = [sys.executable, "-m", "service", "apikey", "create", "chaos-" + "-".join(scopes)]
    for s in scopes:
        args += ["--scope", s]
    out = subprocess.run(args, env=d.env, capture_output=True, text=True, check=True, timeout=60)
    return out.stdout.strip().splitlines()[-1].strip()


def operations(port: int) -> tuple[list[tuple[str, str, dict[str, Any]]], str]:
    """(method, path template, operation) of every /api/v1 operation of the running server."""
    status, body = raw_request(port, "GET", "/openapi.json")
    source = "running server /openapi.json"
    if status != 200:
        body, source = (REPO / "docs" / "openapi.json").read_bytes(), "docs/openapi.json"
    spec = json.loads(body)
    ops = []
    for path, item in spec["paths"].items():
        if path.startswith("/api/v1"):
            for method, op in item.items():
                if method in ("get", "post", "put", "patch", "delete"):
                    ops.append((method.upper(), path, op))
    return ops, source


def fill(path: str, op: dict[str, Any], value: str | None = None, only: str | None = None) -> str:
    """The path with its parameters set: to plausible IDs, or ``only`` to ``value``."""
    for p in op.get("parameters", []):
        if p["in"] == "path":
            schema = p.get("schema", {})
            plausible = "1" if schema.get("type") == "integer" else "1.2.826.0.1.3680043.8.498.1"
            v = value if (value is not None and (only is None or only == p["name"])) else plausible
            path = path.replace("{" + p["name"] + "}", v)
    return path


def check_no_key(
    port: int, ops: list[tuple[str, str, dict[str, Any]]], source: str, good: str
) -> dict[str, Any]:
    key_id = good.split("_")[1] if good.count("_") >= 2 else "x"
    bad_keys = {
        "none": {},
        "malformed": {"X-API-Key": "nonsense"},
        "wrong_secret": {"X-API-Key": f"lusai_{key_id}_wrongsecret"},
        "bearer_garbage": {"Authorization": "Bearer eyJhbGciOiJub25lIn0.e30."},
    }
    statuses: Counter[str] = Counter()
    failures = []
    for method, path, op in ops:
        target = fill(path, op)
        for name, headers in bad_keys.items():
            body = b"{}" if method == "POST" else None
            status, _ = raw_request(
                port, method, target, {"Content-Type": "application/json", **headers}, body
            )
            statuses[str(status)] += 1
            if status != 401:
                failures.append(f"{method} {target} [{name}]: {status}")
    return check(
        "api_without_key",
        not failures and bool(ops),
        operations=len(ops),
        requests=sum(statuses.values()),
        statuses=statuses,
        failures=failures[:10],
        openapi_source=source,
    )


def check_traversal(
    port: int,
    ops: list[tuple[str, str, dict[str, Any]]],
    key: str,
    payloads: list[str],
    d: Deployment,
    work: Path,
) -> dict[str, Any]:
    headers = {"X-API-Key": key, "Content-Type": "application/json"}
    statuses: Counter[str] = Counter()
    failures: list[str] = []
    cases = 0
    for method, path, op in ops:
        params = op.get("parameters", [])
        for p in params:
            if p["in"] == "path":
                targets = [fill(path, op, payload, p["name"]) for payload in payloads]
                path_param = True
            elif p["in"] == "query" and ID_QUERY.search(p["name"]):
                targets = [f"{fill(path, op)}?{p['name']}={payload}" for payload in payloads]
                path_param = False
            else:
                continue
            for target in targets:
                cases += 1
                body = b"{}" if method == "POST" else None
                status, content = raw_request(port, method, target, headers, body)
                statuses[f"{'path' if path_param else 'query'}:{status}"] += 1
                bad = (
                    status >= 500
                    or status < 0
                    or (path_param and 200 <= status < 300)
                    or bool(LEAK.search(content))
                )
                if bad:
                    failures.append(f"{method} {target}: {status} {content[:120]!r}")
    # An upload whose SOP Instance UID is a traversal: refused, and nothing lands outside storage.
    outside = Path("/tmp/lusai-chaos-escape.dcm")
    outside.unlink(missing_ok=True)
    from tests.factories import cine, save

    ds = cine("raw", frames=2, PatientName=PHI_NAME, PatientID="PHI-TRAV")
    evil = "../../../../../../tmp/lusai-chaos-escape.dcm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom: not a valid UI value (the point of it)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = evil
    f = save(ds, work / "traversal-uid.dcm", valid=False)
    up_status, up_body = raw_request(
        port,
        "POST",
        "/api/v1/instances",
        {"X-API-Key": key, "Content-Type": "application/dicom"},
        f.read_bytes(),
    )
    cases += 1
    statuses[f"upload:{up_status}"] += 1
    escaped = outside.exists() or any(
        "lusai-chaos-escape" in str(p) for p in Path(d.env["LUSAI_DATA_DIR"]).rglob("*")
    )
    if up_status not in (400, 422) or escaped:
        failures.append(f"upload with traversal UID: {up_status} {up_body[:120]!r} escaped={escaped}")
    return check(
        "path_traversal",
        not failures,
        requests=cases,
        payloads=len(payloads),
        statuses=statuses,
        failures=failures[:10],
    )


def check_oversize(d: Deployment, port: int, key: str, work: Path) -> dict[str, Any]:
    big = make_cine(work / "big.dcm", 21, frames=100)  # ~1.2 MiB of pixels, over the 1 MiB limit
    data = big.read_bytes()
    assert len(data) > MAX_BYTES
    before = instance_count(d)
    auth = {"X-API-Key": key}
    boundary = "chaosboundary"
    multipart = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.dcm"\r\n'
            "Content-Type: application/dicom\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    cases = {
        "application/dicom": raw_request(
            port, "POST", "/api/v1/instances", {**auth, "Content-Type": "application/dicom"}, data
        )[0],
        "application/dicom chunked": raw_request(
            port,
            "POST",
            "/api/v1/instances",
            {**auth, "Content-Type": "application/dicom"},
            data,
            chunked=True,
        )[0],
        "multipart/form-data": raw_request(
            port,
            "POST",
            "/api/v1/instances",
            {**auth, "Content-Type": f"multipart/form-data; boundary={boundary}"},
            multipart,
        )[0],
    }
    dimse = store(d.port, big, CALLING_AE)
    indexed = instance_count(d) - before
    small = raw_request(
        port,
        "POST",
        "/api/v1/instances",
        {**auth, "Content-Type": "application/dicom"},
        make_cine(work / "small.dcm", 22).read_bytes(),
    )[0]
    ok = all(v == 413 for v in cases.values()) and dimse == "0xA700" and indexed == 0 and small == 202
    return check(
        "oversize_upload",
        ok,
        limit_bytes=MAX_BYTES,
        object_bytes=len(data),
        http=cases,
        dicom=dimse,
        indexed=indexed,
        small_upload=small,
    )


def wait_result(d: Deployment, timeout: float = 180) -> int | None:
    from sqlalchemy import text

    engine = d.engine()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            with engine.connect() as c:
                rid = c.execute(text("SELECT min(id) FROM results")).scalar()
            if rid:
                return int(rid)
            time.sleep(1)
    finally:
        engine.dispose()
    return None


def run(work: Path, quick: bool, extra_logs: list[Path]) -> dict[str, Any]:
    from tests.conftest import free_port

    api_port = free_port()
    env = {
        "LUSAI_MAX_OBJECT_BYTES": str(MAX_BYTES),
        "LUSAI_API_RATE_LIMIT": "0",
        "LUSAI_API_PORT": str(api_port),
    }
    checks = []
    with deployment(work, **env) as d:
        scp = d.start("scp", ["scp"])
        api = d.start("api", ["api"])
        d.start("worker", ["worker"])
        wait_for_echo(d.port, scp)
        wait_api(api_port, api)
        # A real result first: stored SEG, SR and previews beside every traversal attempt.
        assert store(d.port, make_cine(work / "seed.dcm", 0, frames=8), CALLING_AE) == "0x0000"
        result_id = wait_result(d)
        checks.append(check_calling_ae(d, work))
        checks.append(check_tls(d, work))
        admin = create_key(d, "admin", "write", "read")
        ops, source = operations(api_port)
        checks.append(check_no_key(api_port, ops, source, admin))
        payloads = QUICK_TRAVERSALS if quick else TRAVERSALS
        checks.append(check_traversal(api_port, ops, admin, payloads, d, work))
        checks.append(check_oversize(d, api_port, admin, work))
        alive = {p.args[3] if len(p.args) > 3 else str(p.args): p.poll() is None for p in d.procs.procs}
        d.procs.stop_all()
    scanned = [phi_hits(work), *(phi_hits(f) for f in extra_logs)]
    lines = sum(s["log_lines_scanned"] for s in scanned)
    hits = sum(s["phi_hits"] for s in scanned)
    examples = [e for s in scanned for e in s["examples"]][:5]
    folders = [str(work), *map(str, extra_logs)]
    clean = hits == 0 and lines > 0
    checks.append(
        check(
            "phi_in_logs", clean, log_lines_scanned=lines, phi_hits=hits, examples=examples, folders=folders
        )
    )
    checks.append(check("processes_alive", all(alive.values()), processes=alive))
    return {
        "mode": "production: lusai scp (+ a TLS scp), lusai api, lusai worker; PostgreSQL + Redis",
        "result_id_seeded": result_id,
        "checks": checks,
        "ok": all(c["result"] == "PASS" for c in checks),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a subset of the traversal payloads")
    p.add_argument("--logs", type=Path, action="append", default=[], help="more folders of *.log to scan")
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="chaos-security-") as tmp:
        work = a.work or Path(tmp)
        os.makedirs(work, exist_ok=True)
        result = run(work, a.quick, a.logs)
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
