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
    env = {k: v for k, v in os.environ.items() if not k.startswith("VSOCK_PROXY_") and k != "VSOCKPROXY_IN_VM"}
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
