"""The offline release that scripts/package builds: the zipapps and the Amazon Linux 2023 RPMs.

The artifacts are built once per session (scripts/package returns at once when dist/
is up to date, as it is after scripts/test built it). Each zipapp is checked for the
wheels it carries and run with no network under the interpreters it supports; each RPM
for its file list, its dependencies, its scriptlets (run with a stand-in systemctl and
the paths moved into a temporary directory) and an install beside a stand-in of
upstream's package into a scratch RPM database.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import stat
import subprocess
import zipfile
from pathlib import Path

import pytest

from tests.helpers import REPO, LoggedProcess, free_vsock_port, unused_tcp_port
from tests.test_init import imds  # noqa: F401 - the fake IMDS fixture, for the region helper under 3.9

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

VERSION = re.search(r'__version__ = "([^"]+)"', (REPO / "vsockproxy" / "__init__.py").read_text()).group(1)
DIST = REPO / "dist"
ARCHES = ("x86_64", "aarch64")
ALLOWLIST = "/etc/nitro_enclaves/vsock-proxy.yaml"
UNITS = sorted(path.name for path in (REPO / "init").glob("*.service"))
NO_NETWORK = shutil.which("unshare") and subprocess.run(["unshare", "-n", "true"]).returncode == 0


def pyz(arch: str) -> Path:
    return DIST / f"vsock-proxy-{VERSION}-{arch}.pyz"


def rpm_file(arch: str) -> Path:
    return DIST / f"vsockproxy-{VERSION}-1.{arch}.rpm"


def pyenv_python(version: str) -> str:
    """A pyenv CPython ``version`` (e.g. "3.9"), or skip when this machine has none."""
    found = sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/python{version}")))
    if not found:
        pytest.skip(f"no CPython {version} under ~/.pyenv/versions")
    return found[-1]


def offline(argv: list[str]) -> list[str]:
    """``argv`` in a new network namespace (loopback only, and down), so nothing can be downloaded."""
    return ["unshare", "-n", *argv] if NO_NETWORK else argv


def bundle_env(**extra: str) -> dict[str, str]:
    """No pip index, no proxy that works, nothing on PYTHONPATH: only what the bundle carries."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PEX_", "PYTHON", "VSOCK_PROXY_"))}
    env.update(PIP_NO_INDEX="1", HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9",
               PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def rpm(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(["rpm", *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module", autouse=True)
def dist():
    """Build dist/ unless it is already up to date (scripts/test builds it before the tests)."""
    result = subprocess.run([str(REPO / "scripts" / "package")], capture_output=True, text=True, timeout=840)
    assert result.returncode == 0, result.stderr[-3000:]
    assert shutil.which("rpm"), "scripts/package installs Debian's rpm"


# --------------------------------------------------------------------------- the zipapps

def bundled_wheels(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as archive:
        return sorted({name.split("/")[1] for name in archive.namelist()
                       if name.startswith(".deps/") and name.split("/")[1].endswith(".whl")})


def pex_info(path: Path) -> dict:
    with zipfile.ZipFile(path) as archive:
        return json.loads(archive.read("PEX-INFO"))


def binary_tags(wheels: list[str]) -> set[tuple[str, str]]:
    """(python tag, platform tag) of every wheel that is not pure Python."""
    tags = set()
    for wheel in wheels:
        python, _abi, platform = wheel[:-len(".whl")].split("-")[-3:]
        if platform != "any":
            tags.add((python, platform))
    return tags


def test_x86_64_bundle_holds_cp39_and_cp311_manylinux_wheels():
    wheels = bundled_wheels(pyz("x86_64"))
    assert f"vsockproxy-{VERSION}-py3-none-any.whl" in wheels
    gevent = [w for w in wheels if w.startswith("gevent-")]
    assert sorted(w.split("-")[2] for w in gevent) == ["cp311", "cp39"], gevent
    assert any(w.startswith("gevent-25.") and "-cp39-" in w for w in gevent), gevent  # the last cp39 series
    tags = binary_tags(wheels)
    assert {python for python, _ in tags} == {"cp39", "cp311"}, tags
    for python, platform in tags:
        assert all(p.startswith("manylinux") and p.endswith("_x86_64") for p in platform.split(".")), platform
    for name in ("gevent", "greenlet", "pyyaml", "zope_interface"):
        assert {w.split("-")[2] for w in wheels if w.startswith(name + "-")} == {"cp39", "cp311"}, (name, wheels)


def test_aarch64_bundle_holds_cp311_aarch64_wheels_only():
    wheels = bundled_wheels(pyz("aarch64"))
    assert f"vsockproxy-{VERSION}-py3-none-any.whl" in wheels
    assert any(w.startswith("gevent-") for w in wheels), wheels
    tags = binary_tags(wheels)
    assert {python for python, _ in tags} == {"cp311"}, tags
    for _python, platform in tags:
        assert all(p.startswith("manylinux") and p.endswith("_aarch64") for p in platform.split(".")), platform


@pytest.mark.parametrize("arch", ARCHES)
def test_bundle_runs_vsockproxys_own_entry_point(arch):
    info = pex_info(pyz(arch))
    assert info["entry_point"] == "vsockproxy.__main__:main"
    assert info["inherit_path"] == "false"  # nothing from the host's site-packages
    with zipfile.ZipFile(pyz(arch)) as archive:
        main = archive.read("__main__.py").decode()
    # The preamble (interpreter check, SIGHUP ignored) runs before pex's own bootstrap.
    assert main.startswith("#!/usr/bin/env python3\n_vsockproxy_bundle = ")
    assert main.index("_vsockproxy_prepare(_vsockproxy_bundle)") < main.index("Pex project contributors")
    assert pyz(arch).read_bytes().startswith(b"#!/usr/bin/env python3\n")


@pytest.mark.parametrize("version", ["3.9", "3.11"])
def test_x86_64_bundle_runs_offline_under_python(version, tmp_path):
    python = pyenv_python(version)
    result = subprocess.run(offline([python, str(pyz("x86_64")), "--version"]), capture_output=True, text=True,
                            env=bundle_env(PEX_ROOT=str(tmp_path / "pex")), timeout=120)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"vsock-proxy {VERSION}\n", "")


def test_x86_64_bundle_serves_under_python39_offline(tmp_path):
    """Start-up to the listening line and a clean SIGTERM exit: gevent, PyYAML and the metrics from cp39 wheels."""
    python = pyenv_python("3.9")
    config = tmp_path / "allow.yaml"
    config.write_text("allowlist:\n- {address: 127.0.0.1, port: 9}\n")
    port = free_vsock_port()
    process = LoggedProcess(offline([python, str(pyz("x86_64")), str(port), "127.0.0.1", "9", "--config",
                                     str(config), "--metrics-address", f"127.0.0.1:{unused_tcp_port()}"]),
                            bundle_env(PEX_ROOT=str(tmp_path / "pex")))
    try:
        process.wait_for("listening on vsock port", timeout=60)
        process.signal()
        assert process.finish(timeout=30) == 0, process.text()
    finally:
        process.kill()
    assert "Traceback" not in process.text()


def assert_one_line_refusal(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("vsock-proxy: this bundle supports Python ")
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("version", ["3.9", "3.11"])
def test_aarch64_bundle_on_this_x86_64_machine_says_so_in_one_line(version):
    result = subprocess.run([pyenv_python(version), str(pyz("aarch64")), "--version"], capture_output=True,
                            text=True, env=bundle_env(), timeout=60)
    assert_one_line_refusal(result, "supports Python 3.11 on aarch64", f"this is Python {version} on x86_64",
                            "use the x86_64 bundle")


def test_aarch64_bundle_under_python39_on_aarch64_asks_for_python311(tmp_path):
    """Amazon Linux 2023 on Graviton runs python3 (3.9): the bundle names the fix (platform.machine faked)."""
    (tmp_path / "sitecustomize.py").write_text("import platform\nplatform.machine = lambda: 'aarch64'\n")
    bundle = str(pyz("aarch64"))
    result = subprocess.run([pyenv_python("3.9"), bundle, "8000", "127.0.0.1", "443"], capture_output=True,
                            text=True, env=bundle_env(PYTHONPATH=str(tmp_path)), timeout=60)
    assert_one_line_refusal(result, "supports Python 3.11 on aarch64; this is Python 3.9 on aarch64: "
                                    f"install python3.11 and run python3.11 {bundle}")


@pytest.mark.parametrize("version", ["2.7", "3.8", "3.13"])
def test_x86_64_bundle_refuses_other_pythons_in_one_line(version):
    result = subprocess.run([pyenv_python(version), str(pyz("x86_64")), "--version"], capture_output=True,
                            text=True, env=bundle_env(), timeout=60)
    assert_one_line_refusal(result, "supports Python 3.9 or 3.11 on x86_64", f"this is Python {version} on x86_64",
                            "run python3.11")


NOBODY = 65534


def system_python311() -> str:
    """Debian 12's own python3.11: the unprivileged user cannot read root's ~/.pyenv."""
    if not os.access("/usr/bin/python3.11", os.X_OK):
        pytest.skip("no /usr/bin/python3.11")
    return "/usr/bin/python3.11"


def as_nobody(argv: list[str], **env: str) -> subprocess.CompletedProcess:
    """``argv`` as an unprivileged user with no writable home, as a systemd DynamicUser service runs."""
    env = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", **env}
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "env", "-i",
                           *(f"{k}={v}" for k, v in env.items()), *argv],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def nobody_tmp(tmp_path):
    """A temporary directory the unprivileged user can write (tmp_path's parents are root's)."""
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"vsockproxy-nobody-{os.getpid()}-{tmp_path.name}"
    path.mkdir(mode=0o777)
    path.chmod(0o1777)
    yield path
    shutil.rmtree(path)


@pytest.mark.skipif(not shutil.which("setpriv") or os.geteuid() != 0, reason="needs setpriv and root")
def test_bundle_unpacks_without_a_writable_home(nobody_tmp):
    bundle = nobody_tmp / "bundle.pyz"  # readable by nobody wherever the checkout lives
    shutil.copy2(pyz("x86_64"), bundle)
    python = system_python311()
    result = as_nobody([python, str(bundle), "--version"], TMPDIR=str(nobody_tmp))
    assert (result.returncode, result.stdout, result.stderr) == (0, f"vsock-proxy {VERSION}\n", "")
    own = nobody_tmp / f"vsock-proxy-pex-{NOBODY}"
    assert own.is_dir() and stat.S_IMODE(own.stat().st_mode) == 0o700 and own.stat().st_uid == NOBODY

    cache = nobody_tmp / "cache"  # systemd's CacheDirectory=, as the RPM's drop-in sets it
    cache.mkdir()
    os.chown(cache, NOBODY, NOBODY)
    result = as_nobody([python, str(bundle), "--version"], TMPDIR=str(nobody_tmp), CACHE_DIRECTORY=str(cache))
    assert (result.returncode, result.stdout, result.stderr) == (0, f"vsock-proxy {VERSION}\n", "")
    assert (cache / "pex").is_dir()


@pytest.mark.skipif(not shutil.which("setpriv") or os.geteuid() != 0, reason="needs setpriv and root")
def test_bundle_never_loads_code_from_a_directory_another_user_planted(nobody_tmp):
    bundle = nobody_tmp / "bundle.pyz"
    shutil.copy2(pyz("x86_64"), bundle)
    planted = nobody_tmp / f"vsock-proxy-pex-{NOBODY}"
    planted.mkdir(mode=0o777)
    planted.chmod(0o777)  # root's, and writable by anyone
    result = as_nobody([system_python311(), str(bundle), "--version"], TMPDIR=str(nobody_tmp))
    assert (result.returncode, result.stdout, result.stderr) == (0, f"vsock-proxy {VERSION}\n", "")
    assert list(planted.iterdir()) == []
    fresh = [p for p in nobody_tmp.iterdir() if p.name.startswith("vsock-proxy-pex-") and p != planted]
    assert len(fresh) == 1 and fresh[0].stat().st_uid == NOBODY


def test_checksums_match_the_artifacts():
    lines = (DIST / "SHA256SUMS").read_text().splitlines()
    names = sorted(line.split("  ")[1] for line in lines)
    assert names == sorted([pyz(a).name for a in ARCHES] + [rpm_file(a).name for a in ARCHES])
    result = subprocess.run(["sha256sum", "--check", "--quiet", "SHA256SUMS"], cwd=DIST, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- the region helper

def test_region_helper_runs_under_python39(imds):  # noqa: F811 - the imported fixture
    """Amazon Linux 2023's python3 is 3.9: the helper the unit runs first must work there."""
    endpoint, requests = imds(v2=True)
    result = subprocess.run([pyenv_python("3.9"), str(REPO / "init" / "vsock-proxy-region")],
                            env={"VSOCK_PROXY_IMDS": endpoint, "PATH": "/usr/bin:/bin"},
                            capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stdout, result.stderr) == (0, "eu-west-3\n", "")


# --------------------------------------------------------------------------- the RPMs

def expected_paths() -> set[str]:
    paths = {
        "/usr/bin/vsockproxy",
        "/usr/libexec/vsockproxy", "/usr/libexec/vsockproxy/vsock-proxy.pyz",
        "/usr/libexec/vsockproxy/vsock-proxy-region", "/usr/libexec/vsockproxy/vsock-proxy-replace-upstream",
        "/etc/logrotate.d/vsock-proxy",
        "/etc/nitro_enclaves", ALLOWLIST,
        "/usr/share/vsockproxy", "/usr/share/vsockproxy/vsock-proxy.yaml",
    }
    for unit in UNITS:
        paths |= {f"/usr/lib/systemd/system/{unit}", f"/usr/lib/systemd/system/{unit}.d",
                  f"/usr/lib/systemd/system/{unit}.d/vsockproxy-cache.conf"}
    return paths


@pytest.mark.parametrize("arch", ARCHES)
def test_rpm_lists_exactly_the_expected_paths(arch):
    assert "vsock-proxy.service" in UNITS
    listed = rpm("-qlp", str(rpm_file(arch))).stdout.splitlines()
    assert sorted(listed) == sorted(expected_paths())
    fields = rpm("-qp", "--qf", "%{NAME} %{VERSION} %{RELEASE} %{ARCH}", str(rpm_file(arch))).stdout
    assert fields == f"vsockproxy {VERSION} 1 {arch}"


@pytest.mark.parametrize("arch", ARCHES)
def test_rpm_keeps_the_operators_allowlist_and_logrotate_file(arch):
    configs = rpm("-qp", "--configfiles", str(rpm_file(arch))).stdout.splitlines()
    assert sorted(configs) == ["/etc/logrotate.d/vsock-proxy", ALLOWLIST]
    flags = dict(line.split(" ", 1)[::-1] for line in rpm(
        "-qp", "--qf", "[%{FILEFLAGS:fflags} %{FILENAMES}\n]", str(rpm_file(arch))).stdout.splitlines())
    assert flags[ALLOWLIST] == "cng"  # %config(noreplace) %ghost: never in the payload, never replaced
    assert flags["/etc/logrotate.d/vsock-proxy"] == "cn"


@pytest.mark.parametrize("arch, python", [("x86_64", "python3 >= 3.9"), ("aarch64", "python3.11")])
def test_rpm_requires_only_what_amazon_linux_2023_has(arch, python):
    requires = rpm("-qp", "--requires", str(rpm_file(arch))).stdout.splitlines()
    assert sorted({r for r in requires if not r.startswith("rpmlib(")}) == sorted(["/bin/sh", python, "systemd"])


SCRIPTLETS = {"post": "POSTIN", "preun": "PREUN", "postun": "POSTUN"}


@pytest.fixture
def scriptlet(tmp_path):
    """Run one of the x86_64 RPM's scriptlets with logging stand-ins of systemctl and of the replace-upstream
    script, its /etc, /usr/share and /usr/libexec paths moved under tmp_path; returns the calls.

    The script itself, under a real systemd, is tests/e2e/test_vsock_systemd.py's."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "systemctl.calls"
    (bin_dir / "systemctl").write_text(f'#!/bin/sh\necho "$*" >>"{calls}"\n')
    (bin_dir / "systemctl").chmod(0o755)
    root = tmp_path / "root"
    (root / "etc" / "nitro_enclaves").mkdir(parents=True)
    (root / "usr" / "share" / "vsockproxy").mkdir(parents=True)
    shutil.copy(REPO / "conf" / "vsock-proxy.yaml", root / "usr" / "share" / "vsockproxy" / "vsock-proxy.yaml")
    replace = root / "usr" / "libexec" / "vsockproxy" / "vsock-proxy-replace-upstream"
    replace.parent.mkdir(parents=True)
    replace.write_text(f'#!/bin/sh\necho "replace-upstream $*" >>"{calls}"\necho "its output"\n')
    replace.chmod(0o755)

    def run(name: str, arg: str, **env: str) -> list[str]:
        text = rpm("-qp", "--qf", "%{" + SCRIPTLETS[name] + "}", str(rpm_file("x86_64"))).stdout
        for path in ("/etc/nitro_enclaves/", "/usr/share/vsockproxy/", "/usr/libexec/vsockproxy/"):
            text = text.replace(path, str(root) + path)
        assert text.count("/etc/") == text.count(f"{root}/etc/"), text  # nothing outside the scratch root
        calls.unlink(missing_ok=True)
        base = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
        result = subprocess.run(["sh", "-c", text, name, arg], env={**base, **env},
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        return calls.read_text().splitlines() if calls.exists() else []

    run.root = root
    return run


def test_rpm_post_installs_the_default_allowlist_and_leaves_upstream_alone(scriptlet):
    allowlist = scriptlet.root / "etc" / "nitro_enclaves" / "vsock-proxy.yaml"
    assert scriptlet("post", "1") == ["daemon-reload"]
    assert allowlist.read_bytes() == (REPO / "conf" / "vsock-proxy.yaml").read_bytes()
    allowlist.write_text("allowlist: []\n")  # the operator's own, or upstream's
    assert scriptlet("post", "2") == ["daemon-reload"]
    assert allowlist.read_text() == "allowlist: []\n"
    assert scriptlet("post", "1", VSOCKPROXY_REPLACE_UPSTREAM="0") == ["daemon-reload"]


REPLACE = ["daemon-reload", "replace-upstream on"]


def test_rpm_post_replaces_upstreams_service_when_the_marker_file_exists(scriptlet):
    (scriptlet.root / "etc" / "nitro_enclaves" / "vsockproxy-replace-upstream").touch()
    assert scriptlet("post", "1") == REPLACE


def test_rpm_post_replaces_upstreams_service_when_the_variable_asks(scriptlet):
    assert scriptlet("post", "1", VSOCKPROXY_REPLACE_UPSTREAM="1") == REPLACE


def test_rpm_removal_stops_its_own_service_and_undoes_the_replacement(scriptlet):
    (scriptlet.root / "etc" / "nitro_enclaves" / "vsockproxy-replace-upstream").touch()
    assert scriptlet("preun", "1") == []  # an upgrade
    assert scriptlet("postun", "1") == ["daemon-reload", "try-restart vsock-proxy.service"]
    assert scriptlet("preun", "0") == ["disable --now vsock-proxy.service", "replace-upstream off"]
    assert scriptlet("postun", "0") == ["daemon-reload"]


def build_stand_in_upstream(tmp_path: Path) -> Path:
    """An RPM with upstream's three clashing paths, its allowlist different from ours."""
    spec = tmp_path / "upstream.spec"
    spec.write_text("""\
Name: aws-nitro-enclaves-cli
Version: 1.4.2
Release: 1
Summary: stand-in for upstream's package
License: Apache-2.0
%description
stand-in
%install
mkdir -p %{buildroot}/usr/bin %{buildroot}/usr/lib/systemd/system %{buildroot}/etc/nitro_enclaves
echo upstream >%{buildroot}/usr/bin/vsock-proxy
echo '[Service]' >%{buildroot}/usr/lib/systemd/system/nitro-enclaves-vsock-proxy.service
echo 'allowlist: [{address: kms.us-east-1.amazonaws.com, port: 443}]' >%{buildroot}/etc/nitro_enclaves/vsock-proxy.yaml
%files
/usr/bin/vsock-proxy
/usr/lib/systemd/system/nitro-enclaves-vsock-proxy.service
%dir /etc/nitro_enclaves
%config(noreplace) /etc/nitro_enclaves/vsock-proxy.yaml
""")
    top = tmp_path / "rpmbuild"
    result = subprocess.run(["rpmbuild", "-bb", "--quiet", "--target", "x86_64-linux", "--define", f"_topdir {top}",
                             str(spec)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return next((top / "RPMS" / "x86_64").glob("*.rpm"))


@pytest.mark.parametrize("upstream_first", [True, False])
def test_rpm_installs_beside_upstreams_package(tmp_path, upstream_first):
    upstream = build_stand_in_upstream(tmp_path)
    root = tmp_path / "db"
    root.mkdir()
    rpm("--root", str(root), "--initdb")
    first, second = (upstream, rpm_file("x86_64")) if upstream_first else (rpm_file("x86_64"), upstream)
    rpm("--root", str(root), "-i", "--justdb", "--nodeps", "--noscripts", str(first))
    result = subprocess.run(["rpm", "--root", str(root), "-i", "--test", "--nodeps", str(second)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "conflicts" not in result.stderr, result.stderr


@pytest.mark.parametrize("arch", ARCHES)
def test_rpm_payload_units_start_the_installed_programs(tmp_path, arch):
    root = tmp_path / "root"
    root.mkdir()
    rpm("--root", str(root), "--initdb")
    rpm("--root", str(root), "-i", "--nodeps", "--noscripts", "--ignorearch", str(rpm_file(arch)))
    installed = root / "usr" / "libexec" / "vsockproxy" / "vsock-proxy.pyz"
    assert installed.read_bytes() == pyz(arch).read_bytes()
    assert not (root / ALLOWLIST.lstrip("/")).exists()  # a ghost: %post creates it only when missing
    command = (root / "usr" / "bin" / "vsockproxy").read_text()
    replace = root / "usr" / "libexec" / "vsockproxy" / "vsock-proxy-replace-upstream"
    assert replace.read_bytes() == (REPO / "init" / "vsock-proxy-replace-upstream").read_bytes()
    assert os.access(replace, os.X_OK)
    assert "/usr/libexec/vsockproxy/vsock-proxy.pyz" in command
    for unit in UNITS:
        text = (root / "usr" / "lib" / "systemd" / "system" / unit).read_text()
        assert "/usr/local/" not in text
        programs = set(re.findall(r"(/usr/(?:bin|libexec)/[\w./-]+)", text))
        assert programs, text
        for program in programs:
            assert os.access(root / program.lstrip("/"), os.X_OK), (unit, program)
        dropin = root / "usr" / "lib" / "systemd" / "system" / f"{unit}.d" / "vsockproxy-cache.conf"
        assert "CacheDirectory=vsockproxy" in dropin.read_text().splitlines()


# --------------------------------------------------------------------------- the build itself

@pytest.mark.skipif(not NO_NETWORK, reason="needs unshare -n")
def test_package_without_the_index_stops_with_one_clear_line(tmp_path):
    before = {path.name: path.stat().st_mtime_ns for path in DIST.iterdir()}
    result = subprocess.run(["unshare", "-n", str(REPO / "scripts" / "package"), "--force", "--dist",
                             str(tmp_path / "dist")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.startswith("scripts/package: cannot reach the package index https://pypi.org/simple/")
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert not (tmp_path / "dist").exists()
    assert {path.name: path.stat().st_mtime_ns for path in DIST.iterdir()} == before

