"""Lets ``python -m vsockproxy`` behave exactly like the ``vsock-proxy`` command."""

import sys

from vsockproxy.cli import main

sys.exit(main())
