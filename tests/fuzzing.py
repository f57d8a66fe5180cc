"""What every fuzz suite shares: reproducible hypothesis settings, and proof that each test ran its share.

Hypothesis runs derandomized (the same cases every run, no example database) so that CI is
reproducible; a suite lists its cases per test in a ``FUZZ_CASES`` dict, counts the cases it
really ran in ``CASES_RUN``, and checks the count with ``run_counted``.  Kept apart from
helpers.py so that the VM's end-to-end suite never imports hypothesis.
"""

from __future__ import annotations

import time
from typing import Callable

from hypothesis import HealthCheck, settings


def fuzz_settings(cases: int) -> settings:
    """Settings for a fuzz test of ``cases`` generated cases; slow or large cases are the point, not a fault."""
    checks = [getattr(HealthCheck, name) for name in ("too_slow", "data_too_large", "filter_too_much",
                                                      "large_base_example") if hasattr(HealthCheck, name)]
    return settings(max_examples=cases, deadline=None, derandomize=True, database=None,
                    suppress_health_check=checks, print_blob=False)


def run_counted(name: str, inner: Callable[[], None], budget: dict[str, int], counted: dict[str, int]) -> None:
    """Run the @given function ``inner`` and check that it really ran its share, ``budget[name]`` cases."""
    counted[name] = 0
    started = time.monotonic()
    inner()
    print(f"fuzz {name}: {counted[name]} cases in {time.monotonic() - started:.1f}s")
    assert counted[name] >= budget[name], (name, counted[name], budget[name])
