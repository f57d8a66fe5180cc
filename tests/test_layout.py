"""The module map of the README, checked: each module imports only what its one job needs.

Data flows one way: cli -> config -> supervisor -> server -> pipe.  The supervisor joins the
allowlist's matching to the data path by handing each server a route; the server never sees
the allowlist, and the config never sees gevent (it is also what the loader's child runs).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.helpers import REPO

PACKAGE = REPO / "vsockproxy"

#: For each module, the vsockproxy modules it may import (directly).
MAY_IMPORT = {
    "__init__": set(),
    "__main__": {"cli"},
    "cli": {"__init__", "allowlist", "check", "config", "listen", "logs", "supervisor", "workers"},
    "check": {"allowlist", "config", "logs", "notify", "resolver", "supervisor"},
    "config": {"allowlist", "hostnames"},
    "loader": {"config"},
    "supervisor": {"allowlist", "config", "handshake", "http_connect", "listen", "loader", "metrics",
                   "metrics_server", "notify", "resolver", "server", "sni", "socks5"},
    "workers": {"allowlist", "config", "listen", "loader", "metrics", "metrics_server", "notify", "supervisor"},
    "allowlist": {"hostnames", "internal", "resolver"},
    "internal": {"hostnames"},
    "resolver": {"hostnames"},
    "hostnames": set(),
    "listen": set(),
    "server": {"handshake", "hostnames", "listen", "metrics", "pipe", "resolver", "routing"},
    "routing": {"handshake", "hostnames", "sni"},
    "pipe": set(),
    "handshake": set(),
    "sni": {"handshake", "hostnames"},
    "socks5": {"handshake", "hostnames"},
    "http_connect": {"handshake", "hostnames"},
    "metrics": {"pipe"},
    "metrics_server": {"hostnames", "listen"},
    "notify": set(),
    "logs": set(),
}
#: Modules that must not import gevent: they are plain data and checks.
NO_GEVENT = {"__main__", "allowlist", "config", "handshake", "hostnames", "http_connect", "internal", "logs", "notify",
             "sni", "socks5"}


def imports_of(module: str) -> set[str]:
    """Every module ``vsockproxy/MODULE.py`` imports, at any depth of its code, by full name."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            if node.module == "vsockproxy":  # a submodule, or a name from __init__.py
                found.update(f"vsockproxy.{alias.name}" if (PACKAGE / f"{alias.name}.py").exists() else "vsockproxy"
                             for alias in node.names)
    return found


def own_imports(module: str) -> set[str]:
    names = set()
    for name in imports_of(module):
        if name == "vsockproxy":
            names.add("__init__")
        elif name.startswith("vsockproxy."):
            names.add(name.split(".")[1])
    return names - {module}


def test_every_module_is_on_the_map():
    assert {path.stem for path in PACKAGE.glob("*.py")} == set(MAY_IMPORT)


@pytest.mark.parametrize("module", sorted(MAY_IMPORT))
def test_imports_follow_the_map(module):
    unexpected = own_imports(module) - MAY_IMPORT[module]
    assert not unexpected, f"vsockproxy/{module}.py imports {sorted(unexpected)}; the map allows {sorted(MAY_IMPORT[module])}"


@pytest.mark.parametrize("module", sorted(NO_GEVENT))
def test_plain_modules_do_not_import_gevent(module):
    assert not {name for name in imports_of(module) if name.split(".")[0] == "gevent"}


def test_the_readme_map_lists_every_module_with_its_imports():
    """The README's Development section has one line per module: its job, and what it may import."""
    readme = (REPO / "README.md").read_text()
    for module, allowed in MAY_IMPORT.items():
        match = re.search(rf"^\| `{re.escape(module)}\.py` \|[^|]+\|\s*(?P<imports>[^|]*?)\s*\|$", readme, re.MULTILINE)
        assert match, f"the README's module map has no line for {module}.py"
        listed = set(re.findall(r"`(\w+)`", match["imports"]))
        assert listed == allowed, (module, listed, allowed)
