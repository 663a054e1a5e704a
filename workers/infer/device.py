"""Which device a worker analyses on, found before its pool processes start.

The worker's main process forks its pool processes, and a process that has initialised CUDA
cannot hand it to a forked child; so the main process never imports torch: on a host without an
NVIDIA device node the answer is the CPU at once, otherwise a short-lived interpreter asks torch
(``torch.cuda.is_available()`` and the GPU's name) and exits.
"""

from __future__ import annotations

import glob
import json
import logging
import subprocess
import sys

log = logging.getLogger(__name__)

_PROBE = (
    "import json, torch\n"
    "ok = torch.cuda.is_available()\n"
    "print(json.dumps([ok, torch.cuda.get_device_name(0) if ok else None]))\n"
)


def nvidia_present() -> bool:
    """Whether the kernel shows an NVIDIA GPU to this host (or container)."""
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def probe_cuda(timeout: float = 120.0) -> tuple[bool, str | None]:
    """(CUDA usable, name of GPU 0), asked of torch in a child interpreter; (False, None) when it
    cannot tell."""
    try:
        out = subprocess.run(
            [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=timeout, check=True
        )
        ok, name = json.loads(out.stdout.strip().splitlines()[-1])
        return bool(ok), str(name) if name else None
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        log.warning("CUDA probe failed: analysing on the CPU", extra={"ctx": {"error": type(exc).__name__}})
        return False, None


def detect_device(setting: str) -> tuple[str, str | None]:
    """The device ``LUSAI_DEVICE`` (auto, cpu, cuda) means on this host, and the GPU's name.

    ``cuda`` stays ``cuda`` even when the probe fails (the model will not load and jobs fail with
    the reason, as before); ``auto`` is ``cuda`` only when the probe finds it usable.
    """
    if setting == "cpu":
        return "cpu", None
    if setting == "cuda":
        return "cuda", probe_cuda()[1]
    if not nvidia_present():
        return "cpu", None
    ok, name = probe_cuda()
    return ("cuda", name) if ok else ("cpu", None)
