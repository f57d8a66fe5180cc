"""The (architecture, Python) pairs each bundle serves, as pex "complete platforms".

The targets are Amazon Linux 2023 instances: glibc 2.34, ``python3`` 3.9 and the
optional ``python3.11``.  pex's abbreviated ``--platform`` strings would assume
manylinux2014 and miss gevent's manylinux_2_28 wheels, so the complete tag lists
are written out here with ``packaging.tags``, exactly as ``pex3 interpreter
inspect --tags`` would print them on such an instance.  Only manylinux and pure
wheels qualify: a plain ``linux_*`` wheel was built on some other machine.
"""

from __future__ import annotations

from packaging.tags import compatible_tags, cpython_tags

#: Amazon Linux 2023's C library: manylinux_2_34 and older wheels run there.
GLIBC = (2, 34)

#: What each bundle holds: gevent has cp39 wheels on x86_64 (up to 25.9.1) but
#: none recent enough on aarch64 (22.10.2, older than requirements.txt allows).
BUNDLES: dict[str, tuple[tuple[int, int], ...]] = {
    "x86_64": ((3, 9), (3, 11)),
    "aarch64": ((3, 11),),
}

#: The legacy manylinux names, each an alias of one glibc version.
LEGACY_MANYLINUX = {(2, 17): "manylinux2014", (2, 12): "manylinux2010", (2, 5): "manylinux1"}


def platform_tags(arch: str) -> list[str]:
    """Platform tags a glibc-2.34 ``arch`` machine accepts, most specific first."""
    oldest = 5 if arch == "x86_64" else 17  # manylinux started at glibc 2.17 on aarch64
    tags = []
    for minor in range(GLIBC[1], oldest - 1, -1):
        tags.append(f"manylinux_2_{minor}_{arch}")
        legacy = LEGACY_MANYLINUX.get((2, minor))
        if legacy:
            tags.append(f"{legacy}_{arch}")
    return tags


def complete_platform(arch: str, version: tuple[int, int]) -> dict:
    """pex's ``--complete-platform`` JSON for CPython ``version`` on Linux ``arch``."""
    python = "%d.%d" % version
    platforms = platform_tags(arch)
    tags = [*cpython_tags(version, platforms=platforms), *compatible_tags(version, "cp%d%d" % version, platforms)]
    return {
        "marker_environment": {
            # The patch release varies between instances; markers rarely test it (dnspython's do).
            "implementation_version": python + ".0",
            "python_full_version": python + ".0",
            "implementation_name": "cpython",
            "os_name": "posix",
            "platform_machine": arch,
            "platform_python_implementation": "CPython",
            "platform_system": "Linux",
            "python_version": python,
            "sys_platform": "linux",
        },
        "compatible_tags": [str(tag) for tag in tags],
    }
