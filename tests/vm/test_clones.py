"""A fresh clone anywhere a user may put one runs the VM harness and the systemd unit: under /tmp, under $HOME,
and in a path with a space.  Run on the host; each clone boots a VM with systemd (a few minutes in all).

Each clone is of this repository's committed HEAD.  Its .venv reuses this one's packages (a venv of the same
interpreter whose .pth puts the clone first, then this .venv's site-packages), so no clone downloads anything.
From each clone the harness (with --systemd) runs a check of the cwd, of the clone's own package and of vsock
loopback, and then the start, sandbox and request steps of tests/e2e/test_vsock_systemd.py, which install the clone
under /opt as an operator would: the steps that depend on where the checkout is.  Every clone is removed after
its test, failed or not.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

from tests.helpers import REPO
from tests.vm.test_harness import VSOCK_ECHO

VM_TIMEOUT_S = 600
GUEST_SYSTEMD_TESTS = "start_reaches_ready or runs_in_the_units_sandbox or reaches_the_regional_kms_endpoint"

pytestmark = [
    pytest.mark.vm,
    pytest.mark.slow,
    pytest.mark.timeout(2 * VM_TIMEOUT_S + 300, func_only=True),
    pytest.mark.skipif(os.environ.get("VSOCKPROXY_IN_VM") == "1", reason="already inside the VM"),
]

# Where the clone goes: (parent of a fresh temporary directory, its name prefix, the clone's name in it).
LOCATIONS = {
    "tmp": ("/tmp", "vsockproxy-clone-", "vsockproxy"),
    "home": (os.path.expanduser("~"), "vsockproxy-clone-", "vsockproxy"),
    "space": ("/tmp", "vsockproxy clone ", "my vsockproxy"),
}

CHECK = """
import os, sys
import vsockproxy
clone = sys.argv[1]
assert os.getcwd() == clone, (os.getcwd(), clone)
assert vsockproxy.__file__ == os.path.join(clone, "vsockproxy", "__init__.py"), vsockproxy.__file__
print("cwd and package ok")
""" + VSOCK_ECHO


def git(*args: str, cwd: Path = REPO) -> str:
    result = subprocess.run(["git", *args], cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, f"git {' '.join(args)}: {result.stderr}"
    return result.stdout.strip()


def chained_venv(clone: Path) -> None:
    """clone/.venv: this interpreter's venv whose packages are the clone's own, then this .venv's."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(clone / ".venv")], check=True, timeout=120)
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    site_packages = clone / ".venv" / "lib" / version / "site-packages"
    ours = sysconfig.get_paths()["purelib"]
    (site_packages / "vsockproxy-clone.pth").write_text(f"{clone}\nimport site; site.addsitedir({ours!r})\n")


@pytest.fixture(params=sorted(LOCATIONS))
def clone(request):
    """A clone of HEAD with its .venv, at LOCATIONS[param]; removed afterwards, whatever happened."""
    if not (REPO / ".git").exists() or shutil.which("git") is None:
        pytest.skip("needs git and a git checkout")
    head = git("rev-parse", "HEAD")
    parent, prefix, name = LOCATIONS[request.param]
    top = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        path = top / name
        git("clone", "--quiet", "--no-checkout", str(REPO), str(path))
        git("checkout", "--quiet", "--detach", head, cwd=path)
        chained_venv(path)
        yield path
    finally:
        shutil.rmtree(top)
    assert not top.exists()


def harness(clone: Path, *args: str) -> subprocess.CompletedProcess:
    """The clone's scripts/vsock-vm, run from the clone with its .venv's python."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run([str(clone / "scripts" / "vsock-vm"), "--timeout", str(VM_TIMEOUT_S), *args],
                            cwd=clone, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=VM_TIMEOUT_S + 60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_a_clone_runs_the_harness_and_the_systemd_unit(clone):
    subprocess.run([str(clone / "scripts" / "vsock-vm"), "--prepare", "--systemd"], stdin=subprocess.DEVNULL,
                   timeout=1200, check=True)
    python = str(clone / ".venv" / "bin" / "python")
    # One boot for both: the check, then the systemd steps (a boot under TCG costs more than either).
    script = ('"$1" -c "$2" "$PWD" && exec "$1" -m pytest -p no:cacheprovider -p no:hypothesispytest -m vsock '
              '-k "$3" tests/e2e/test_vsock_systemd.py')
    result = harness(clone, "--systemd", "--", "sh", "-c", script, "sh", python, CHECK, GUEST_SYSTEMD_TESTS)
    report = result.stdout + result.stderr
    assert result.stdout.startswith("cwd and package ok\nPING OVER VSOCK\n"), report
    summary = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"=+ 3 passed, 9 deselected in [\d.]+s( \(.*\))? =+", summary), report
