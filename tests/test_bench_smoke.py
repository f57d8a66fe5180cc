"""scripts/bench must not rot: its smoke mode runs every proxy through every scenario on the host.

The figures themselves are not judged here (benchmarks print numbers; tests do not time things),
only that the run completes, prints its table, and writes numeric figures for each proxy and
scenario, with no failed connection through direct or vsockproxy.  connect-churn (HTTP CONNECT per
connection, issue 13) runs only through vsockproxy, with its ratios to vsockproxy's own churn.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "scripts" / "bench"
PROXIES = ["direct", "socat", "socat-big", "vsockproxy"]
SCENARIOS = ["bulk-up", "bulk-down", "aggregate", "pingpong", "mixed", "issue413", "churn", "connect-churn",
             "concurrency", "burst"]
#: The scenarios of a request-routed mode, and the proxies among PROXIES that speak it.
ROUTED = {"connect-churn": ["vsockproxy"]}


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_bench_smoke_host(tmp_path):
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("VSOCK_PROXY_") and k not in ("VSOCKPROXY_IN_VM", "VSOCKPROXY_UPSTREAM_DIR")}
    result = subprocess.run([sys.executable, str(BENCH), "--smoke", "--transport", "host", "--json", str(out)],
                            cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-4000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-4000:]

    # the table: a section per scenario, a row per proxy
    for scenario in SCENARIOS:
        assert f"\n{scenario}: " in result.stdout, result.stdout
    for proxy in PROXIES:
        assert f"\n  {proxy} " in result.stdout, result.stdout
    assert "total " in result.stdout

    report = json.loads(out.read_text())
    assert report["transport"] == "host" and report["smoke"] is True
    assert report["harness_errors"] == 0
    assert report["proxies"] == PROXIES
    assert sorted(report["scenarios"]) == sorted(SCENARIOS)
    for scenario, entry in report["scenarios"].items():
        metrics = entry["metrics"]
        for proxy in PROXIES:
            res = entry["results"][proxy]
            if proxy not in ROUTED.get(scenario, PROXIES):
                assert res["skipped"] == "no CONNECT" and res["runs"] == [], (scenario, proxy, res)
                continue
            assert res["harness_errors"] == [], (scenario, proxy, res["harness_errors"])
            assert len(res["runs"]) == report["repeat"], (scenario, proxy)
            for key, metric in metrics.items():
                value = res["median"][key]
                memory = key in ("peak_rss_mib", "group_pss_mib", "procs")
                if proxy == "direct" and memory:
                    assert value is None  # no proxy process to measure
                    continue
                assert isinstance(value, (int, float)) and math.isfinite(value), (scenario, proxy, key, value)
                if metric["ratio"]:
                    assert res["vs_direct"][key] is not None and res["vs_socat"][key] is not None
            assert isinstance(res["failures"], int)
            if proxy in ("direct", "vsockproxy"):
                assert res["failures"] == 0, (scenario, proxy, res["errors"])
    # the proxies really ran, and carried the bytes
    assert report["scenarios"]["bulk-up"]["results"]["vsockproxy"]["median"]["mib_per_s"] > 0
    assert report["scenarios"]["concurrency"]["results"]["vsockproxy"]["median"]["peak_rss_mib"] > 0
    _check_connect_churn(report, result.stdout, "vsockproxy", skipped=["direct", "socat", "socat-big"])


def _check_connect_churn(report: dict, stdout: str, proxy: str, skipped: list[str]) -> None:
    """connect-churn ran through ``proxy`` alone, with every connection's handshake, and its ratio to churn."""
    res = report["scenarios"]["connect-churn"]["results"][proxy]
    churn = report["scenarios"]["churn"]["results"][proxy]["median"]
    assert res["failures"] == 0 and not res["harness_errors"], res
    assert res["median"]["conns_per_s"] > 0 and res["median"]["p99_ms"] > 0, res
    for key in ("conns_per_s", "p99_ms"):  # the handshake's cost, against the same proxy's churn
        assert res["vs_churn"][key] == pytest.approx(res["median"][key] / churn[key]), (key, res)
        assert 0 < res["vs_churn"][key] < 20, (key, res)  # a short smoke run is noisy; nonsense is not
    expected_extra = 1e6 * (1 / res["median"]["conns_per_s"] - 1 / churn["conns_per_s"])
    assert res["extra_us_per_connection"] == pytest.approx(expected_extra), res
    assert "\nconnect-churn: " in stdout and "x churn" in stdout, stdout
    assert f"\n  handshake cost, {proxy}: conn/s " in stdout, stdout
    if skipped:
        assert f"\n  not run (no CONNECT): {', '.join(skipped)}\n" in stdout, stdout


def _bench(tmp_path, *args, env_extra=None):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("VSOCK_PROXY_") and k not in ("VSOCKPROXY_IN_VM", "VSOCKPROXY_UPSTREAM_DIR")}
    env.update(env_extra or {})
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(BENCH), "--smoke", "--transport", "host", "--scenarios", "churn",
                             "--repeat", "1", "--json", str(out), *args],
                            cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=90)
    return result, (json.loads(out.read_text()) if out.exists() else None)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_bench_upstream_row_runs_the_tcp_build_from_the_environment(tmp_path):
    """$VSOCKPROXY_UPSTREAM_DIR's vsock-proxy-tcp runs with upstream's command line (here a socat stand-in)."""
    upstream_dir = tmp_path / "upstream"
    upstream_dir.mkdir()
    fake = upstream_dir / "vsock-proxy-tcp"
    # upstream's CLI: LOCAL_PORT REMOTE_ADDR REMOTE_PORT --config FILE -w N; record it, then relay like it
    fake.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/argv\n'
                    'exec socat TCP4-LISTEN:$1,bind=127.0.0.1,reuseaddr,fork TCP:$2:$3\n')
    fake.chmod(0o755)
    result, report = _bench(tmp_path, "--proxies", "direct,upstream",
                            env_extra={"VSOCKPROXY_UPSTREAM_DIR": str(upstream_dir)})
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-4000:]}"
    assert "\n  upstream " in result.stdout, result.stdout
    churn = report["scenarios"]["churn"]["results"]["upstream"]
    assert churn["failures"] == 0 and churn["median"]["conns_per_s"] > 0, churn
    argv = (tmp_path / "argv").read_text().split()
    assert len(argv) == 7 and argv[0].isdigit() and argv[1] == "127.0.0.1" and argv[2].isdigit(), argv
    assert argv[3] == "--config" and argv[4].endswith(".yaml") and argv[5:] == ["-w", "100"], argv


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_bench_without_upstream_binaries_notes_it_and_runs_the_rest(tmp_path):
    result, report = _bench(tmp_path, "--proxies", "direct,upstream", "--upstream", str(tmp_path / "absent"))
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-4000:]}"
    notes = [line for line in result.stderr.splitlines() if "upstream" in line]
    assert notes == [f"bench: note: no upstream row: {tmp_path / 'absent' / 'vsock-proxy-tcp'} is missing or not "
                     "executable (../shared/tools/build-upstream makes it)"], result.stderr
    assert report["proxies"] == ["direct"] and "\n  upstream " not in result.stdout


CONNECT_STAND_IN = """
import socket, sys, threading

def pipe(src, dst):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

def handle(client):
    with client:
        head = b""
        while b"\\r\\n\\r\\n" not in head:
            data = client.recv(4096)
            if not data:
                return
            head += data
        method, authority = head.split(b"\\r\\n")[0].split()[:2]
        host, _, port = authority.decode().rpartition(":")
        if method != b"CONNECT":
            client.sendall(b"HTTP/1.1 405 Method Not Allowed\\r\\n\\r\\n")
            return
        with socket.create_connection((host, int(port))) as target:
            client.sendall(b"HTTP/1.1 200 Connection established\\r\\n\\r\\n")
            back = threading.Thread(target=pipe, args=(target, client), daemon=True)
            back.start()
            pipe(client, target)
            back.join()

listener = socket.create_server(("127.0.0.1", int(sys.argv[1])), backlog=1024)
while True:
    threading.Thread(target=handle, args=(listener.accept()[0],), daemon=True).start()
"""


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("load", ["c", "python"])
def test_bench_connect_churn_through_a_proxy_cmd_for_the_mode(tmp_path, load):
    """--proxy-cmd NAME@http-connect=... adds a CONNECT proxy (a stand-in here) to connect-churn,
    through the C load generator and the Python one, and only there: socat has no CONNECT."""
    stand_in = tmp_path / "connect_stand_in.py"
    stand_in.write_text(CONNECT_STAND_IN)
    result, report = _bench(tmp_path, "--scenarios", "churn,connect-churn", "--proxies", "socat,relay",
                            "--load", load, "--proxy-cmd", "relay=socat {listen},reuseaddr,fork TCP:{target}",
                            "--proxy-cmd", f"relay@http-connect={{python}} {shlex.quote(str(stand_in))} {{listen_port}}")
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-4000:]}"
    assert report["load_generator"] == load
    _check_connect_churn(report, result.stdout, "relay", skipped=["socat"])
