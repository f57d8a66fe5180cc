"""Fail early, in one line, when the package index that the build downloads from cannot be reached.

Standard library only: it runs before the build tools are installed.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request

INDEX = "https://pypi.org/simple/"


def main() -> int:
    try:
        with urllib.request.urlopen(INDEX + "gevent/", timeout=20) as response:
            response.read(1)
    except (OSError, urllib.error.URLError) as exc:
        print(f"scripts/package: cannot reach the package index {INDEX} ({getattr(exc, 'reason', exc)}): "
              "the build downloads every dependency's wheels from it; check the network or HTTPS_PROXY",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
