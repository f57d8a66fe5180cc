"""The short soak that CI runs: ``scripts/soak --seconds 30 --transport host --json FILE``.

Mixed traffic (bulk, ping-pong, churn) through the real ``vsock-proxy`` command on its TCP
stand-in listener for 30 s, every byte hash-checked and the proxy's RSS sampled every 2 s; the
script's own verdict must be PASS and its figures must say why.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO, cli_env

SOAK = REPO / "scripts" / "soak"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_30_second_host_soak_passes_with_no_growth_no_failures_no_mismatches(tmp_path):
    report_path = tmp_path / "soak.json"
    result = subprocess.run([sys.executable, str(SOAK), "--seconds", "30", "--transport", "host",
                             "--json", str(report_path)],
                            cwd=REPO, env=cli_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stderr.rstrip().endswith("verdict: PASS"), result.stderr[-4000:]
    assert "Traceback" not in result.stderr
    report = json.loads(report_path.read_text())

    assert report["transport"] == "host" and report["duration_s"] == 30
    assert report["verdict"] == "pass" and all(report["checks"].values()), report["checks"]
    assert report["failures"] == 0 and report["mismatches"] == 0 and report["target_errors"] == 0
    assert report["failure_examples"] == []

    samples = report["samples"]
    assert report["sample_interval_s"] == 2 and 14 <= len(samples) <= 16, [s["t"] for s in samples]
    assert all(s["failures"] == 0 and s["mismatches"] == 0 for s in samples)
    after_warmup = [s for s in samples if s["t"] >= report["warmup_s"]]
    assert report["baseline_rss_kib"] == after_warmup[0]["rss_kib"]
    assert report["final_rss_kib"] == samples[-1]["rss_kib"]
    assert report["growth_kib"] == report["final_rss_kib"] - report["baseline_rss_kib"]
    assert report["growth_limit_kib"] == max(round(0.05 * report["baseline_rss_kib"]), 2048)
    assert report["growth_kib"] <= report["growth_limit_kib"]

    connections = report["connections"]
    assert connections["bulk"] > 0 and connections["pingpong"] > 0 and connections["churn"] > 0
    assert connections["total"] == connections["bulk"] + connections["pingpong"] + connections["churn"]
    assert report["round_trips"] > 0
    assert report["bytes_up"] == report["bytes_down"] > 100 * (1 << 20)
    assert report["proxy_log"] == {"closed": connections["total"], "closed_eof": connections["total"],
                                   "warnings": 0, "errors": 0, "examples": []}
    assert report["fds"]["sockets_after"] == report["fds"]["sockets_before"] == 1
    assert report["proxy_exit_code"] == 0


@pytest.mark.parametrize("argv", [["--seconds", "2"], ["--minutes", "1", "--seconds", "30"],
                                  ["--transport", "tcp"]])
def test_soak_usage_errors_exit_2(argv):
    result = subprocess.run([sys.executable, str(SOAK), *argv], cwd=REPO, env=cli_env(), stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "soak: error:" in result.stderr
