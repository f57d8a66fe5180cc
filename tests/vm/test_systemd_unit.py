"""The systemd unit under a real systemd: boots ``scripts/vsock-vm --systemd`` once, on the host.

The steps themselves (start, request over vsock, journal, metrics, services: file, reload,
drain on stop) are tests/e2e/test_vsock_systemd.py, which runs inside that VM and only
there; this test passes when all of them ran and passed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HARNESS = REPO / "scripts" / "vsock-vm"
GUEST_TESTS = "tests/e2e/test_vsock_systemd.py"
# systemd's boot takes 15-30 s under TCG, each start of the proxy several more.
VM_TIMEOUT_S = 900

pytestmark = [
    pytest.mark.vm,
    pytest.mark.timeout(VM_TIMEOUT_S + 120, func_only=True),
    pytest.mark.skipif(os.environ.get("VSOCKPROXY_IN_VM") == "1", reason="already inside the VM"),
]


def test_the_unit_starts_serves_reloads_and_drains_under_systemd() -> None:
    subprocess.run([str(HARNESS), "--prepare", "--systemd"], stdin=subprocess.DEVNULL, timeout=1200, check=True)
    result = subprocess.run(
        [str(HARNESS), "--systemd", "--timeout", str(VM_TIMEOUT_S), "--",
         sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:hypothesispytest",
         "-m", "vsock", "-s", GUEST_TESTS],
        cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=VM_TIMEOUT_S + 60,
        check=False)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    summary = report.strip().splitlines()[-1]
    assert re.fullmatch(r"=+ \d+ passed in [\d.]+s( \(.*\))? =+", summary), report
