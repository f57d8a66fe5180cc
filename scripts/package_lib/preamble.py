# vsock-proxy bundle preamble: pex runs this first, before its own bootstrap.
#
# scripts/package prepends the line `_vsockproxy_bundle = {...}` naming the bundle's
# architecture and Python versions. Written for any Python (no f-strings): it has to
# refuse an unsupported interpreter in one line rather than fail in pex's bootstrap or
# in a wheel built for another Python.


def _vsockproxy_prepare(bundle):
    """Refuse an interpreter this bundle has no wheels for; pick a PEX_ROOT that works."""
    import os
    import platform
    import signal
    import sys

    # vsock-proxy treats SIGHUP as reload and SIGUSR1 as a summary; until its handlers
    # are installed, either would kill the process. Unpacking the bundle on first run
    # takes seconds, so ignore both from the very start (exec keeps SIG_IGN).
    for name in ("SIGHUP", "SIGUSR1"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)

    machine = platform.machine()
    version = tuple(sys.version_info[:2])
    pythons = [tuple(v) for v in bundle["pythons"]]
    implementation = platform.python_implementation()
    if (implementation, sys.platform, machine, version) not in [
            ("CPython", "linux", bundle["arch"], v) for v in pythons]:
        wanted = " or ".join("%d.%d" % v for v in pythons)
        if machine != bundle["arch"] or not sys.platform.startswith("linux"):
            advice = "use the %s bundle" % machine
        else:
            advice = "install python%d.%d and run python%d.%d %s" % (pythons[-1] + pythons[-1] + (sys.argv[0],))
        sys.stderr.write("vsock-proxy: this bundle supports Python %s on %s; this is %s %d.%d on %s: %s\n" % (
            wanted, bundle["arch"], "Python" if implementation == "CPython" else implementation,
            version[0], version[1], machine, advice))
        sys.exit(1)

    if "PEX_ROOT" not in os.environ:
        root = _vsockproxy_pex_root()
        if root:
            os.environ["PEX_ROOT"] = root


def _vsockproxy_pex_root():
    """Where to unpack the bundle when pex's default, ~/.cache/pex, cannot be written.

    A systemd DynamicUser= service has no writable home. There, use the unit's
    CacheDirectory= (kept across restarts) if it has one, else a directory of our own
    in the temporary directory (private to the unit under PrivateTmp=). None keeps
    pex's default.
    """
    import os
    import stat
    import tempfile

    def writable(path):
        while not os.path.isdir(path):
            parent = os.path.dirname(path)
            if parent == path:
                return False
            path = parent
        return os.access(path, os.W_OK)

    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    if writable(os.path.join(cache_home, "pex")):
        return None
    cache_directory = os.environ.get("CACHE_DIRECTORY", "").split(":")[0]
    if cache_directory and writable(cache_directory):
        return os.path.join(cache_directory, "pex")
    own = os.path.join(tempfile.gettempdir(), "vsock-proxy-pex-%d" % os.getuid())
    try:
        os.mkdir(own, 0o700)
    except OSError:
        pass
    try:
        info = os.lstat(own)
    except OSError:
        info = None
    # Code is loaded from here: use it only if it is ours alone, never one planted by another user.
    if info is None or not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
        own = tempfile.mkdtemp(prefix="vsock-proxy-pex-")
    return own


_vsockproxy_prepare(_vsockproxy_bundle)
del _vsockproxy_prepare, _vsockproxy_pex_root, _vsockproxy_bundle
