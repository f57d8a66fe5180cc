"""What scripts/bench and scripts/soak share: their venv, the VM round trip, output and limits.

Both scripts are thin launchers: they make sure gevent can be imported (re-running under the
checkout's .venv when started with the machine's python3), then call their module's main().
With ``--transport vm`` each re-runs itself inside scripts/vsock-vm and brings its JSON back
on stdout between two marker lines, since the VM sees the host's files read-only.
"""

from __future__ import annotations

import os
import resource
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
VSOCK_VM = REPO / "scripts" / "vsock-vm"
IN_VM = os.environ.get("VSOCKPROXY_IN_VM") == "1"


def use_venv(prog: str, script: str) -> None:
    """Return if gevent imports; else re-run ``script`` under the checkout's .venv, or exit saying why."""
    try:
        import gevent  # noqa: F401
    except ImportError:
        venv_python = REPO / ".venv" / "bin" / "python"
        # sys.prefix, not the executable: a venv's python is a symlink to the very interpreter it runs.
        if venv_python.exists() and Path(sys.prefix).resolve() != (REPO / ".venv").resolve():
            os.execv(str(venv_python), [str(venv_python), script, *sys.argv[1:]])
        sys.exit(f"{prog}: gevent is not installed (run scripts/bootstrap)")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def markers(prog: str) -> tuple[str, str]:
    """The lines between which a VM run returns its JSON on stdout."""
    return f"----- {prog} json begin -----", f"----- {prog} json end -----"


def run_in_vm(prog: str, argv: list[str], json_path: str | None, vm_options: list[str]) -> int:
    """On the host: re-run ``scripts/PROG ARGV`` inside scripts/vsock-vm; write its JSON to ``json_path``."""
    if not VSOCK_VM.exists():
        raise SystemExit(f"{prog}: {VSOCK_VM.relative_to(REPO)} is missing; the vm transport needs it")
    inner = list(argv)
    if json_path:
        inner = strip_option(inner, "--json")
        inner.append("--json-stdout")
    command = [str(VSOCK_VM), *vm_options, "--", sys.executable, str(REPO / "scripts" / prog), *inner]
    log(f"{prog}: running in the VM: {shlex.join(command)}")
    begin, end = markers(prog)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=REPO)
    capture: list[str] | None = None
    payload = None
    try:
        for line in proc.stdout:
            stripped = line.rstrip("\n")
            if stripped == begin:
                capture = []
            elif stripped == end and capture is not None:
                payload, capture = "\n".join(capture), None
            elif capture is not None:
                capture.append(stripped)
            else:
                sys.stdout.write(line)
                sys.stdout.flush()
        code = proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return 130
    if json_path:
        if payload is None:
            log(f"{prog}: the VM run returned no figures")
            return code or 1
        Path(json_path).write_text(payload + "\n")
    return code


def write_all(stream, text: str) -> None:
    """Write text in full, in slices: the VM's virtio console takes at most 32 KiB per write(), and
    Python's sys.stdout silently drops the rest of a larger write there."""
    stream.flush()
    data = memoryview(text.encode())
    fd = stream.fileno()
    while data:
        try:
            data = data[os.write(fd, data[:16384]):]
        except BlockingIOError:
            time.sleep(0.01)


def strip_option(argv: list[str], option: str) -> list[str]:
    """``argv`` without ``option`` and its value (``--opt V`` or ``--opt=V``)."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == option:
            skip = True
        elif not item.startswith(option + "="):
            out.append(item)
    return out


def raise_nofile(needed: int) -> bool:
    """Raise RLIMIT_NOFILE to ``needed`` (or the hard limit); returns whether ``needed`` was reached."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return True
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, max(hard, needed)))
        return True
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard >= needed
