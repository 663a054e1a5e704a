"""``lusai scp`` as operators run it: a subprocess, several processes sharing the port."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import which
from tests.factories import cine, save
from tests.service.receive.conftest import subprocess_scp

pytestmark = pytest.mark.network


def test_lusai_scp_processes_share_one_port(tmp_path: Path) -> None:
    """Two SCP processes (SO_REUSEPORT) take four concurrent storescu associations."""
    exe = which("storescu")
    files = [save(cine("jpeg", frames=4, seed=i), tmp_path / f"{i}.dcm") for i in range(8)]
    with subprocess_scp(tmp_path / "data", "--processes", "2") as scp:
        procs = [
            subprocess.Popen(
                [exe, "-xy", "-aet", f"SCU{i}", "-aec", "LUSAI", "127.0.0.1", str(scp.port),
                 str(files[2 * i]), str(files[2 * i + 1])],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            )
            for i in range(4)
        ]  # fmt: skip
        for p in procs:
            out, _ = p.communicate(timeout=60)
            assert p.returncode == 0, out
        instances = scp.instances()
        assert len(instances) == 8
        assert {i.transfer_syntax_uid for i in instances} == {"1.2.840.10008.1.2.4.50"}
        # one job each; a job's message may be there twice: the other process's recovery sweep
        # can send a job committed but not yet stamped as sent (at least once; claim lets one work)
        assert sorted(set(scp.queued_job_ids())) == sorted(j.id for j in scp.jobs())
        assert len(scp.jobs()) == 8
        assert scp.temp_files() == []
