"""scripts/bench must not rot: its smoke mode runs every proxy through every scenario on the host.

The figures themselves are not judged here (benchmarks print numbers; tests do not time things),
only that the run completes, prints its table, and writes numeric figures for each proxy and
scenario, with no failed connection through direct or vsockproxy.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "scripts" / "bench"
PROXIES = ["direct", "socat", "socat-big", "vsockproxy"]
SCENARIOS = ["bulk-up", "bulk-down", "aggregate", "pingpong", "mixed", "issue413", "churn", "concurrency", "burst"]


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
