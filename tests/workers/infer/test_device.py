"""The device a worker analyses on, found without torch in the worker's main process."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO
from workers.infer import device


def _no_probe(*_: object, **__: object) -> tuple[bool, str | None]:
    raise AssertionError("probed")


def test_cpu_and_a_host_without_nvidia_device_need_no_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device, "probe_cuda", _no_probe)
    monkeypatch.setattr(device, "nvidia_present", lambda: False)
    assert device.detect_device("cpu") == ("cpu", None)
    assert device.detect_device("auto") == ("cpu", None)


def test_auto_is_cuda_only_when_torch_can_use_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device, "nvidia_present", lambda: True)
    monkeypatch.setattr(device, "probe_cuda", lambda: (True, "NVIDIA H200"))
    assert device.detect_device("auto") == ("cuda", "NVIDIA H200")
    monkeypatch.setattr(device, "probe_cuda", lambda: (False, None))  # driver there, CUDA not usable
    assert device.detect_device("auto") == ("cpu", None)
    assert device.detect_device("cuda") == ("cuda", None)  # asked for: the model load will say why


def test_the_probe_asks_a_child_interpreter_and_survives_its_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    # the real probe, in a process that must not load torch itself (it forks the pool afterwards)
    code = (
        "import sys, workers.infer.device as d; "
        "ok, name = d.probe_cuda(); d.detect_device('auto'); "
        "assert 'torch' not in sys.modules; print(ok)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() in ("True", "False"), out.stderr[-2000:]

    def broken(*_: object, **__: object) -> object:
        raise subprocess.CalledProcessError(1, "python")

    monkeypatch.setattr(device.subprocess, "run", broken)
    assert device.probe_cuda() == (False, None)
