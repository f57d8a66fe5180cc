"""Build the offline release into dist/: a pex zipapp and an Amazon Linux 2023 RPM per architecture.

Run by scripts/package with .venv-package's Python (pex and packaging installed).
Every wheel comes from the package index at build time, into a pex cache under
build/ that a fresh clone does not have; nothing is taken from the machine's own
pip configuration or caches (pex runs pip with --isolated).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import check_index
import platforms

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
WORK = REPO / "build" / "package"
PEX_ROOT = REPO / "build" / "pex-root"
#: The pip that pex resolves with: pinned, so a build does not change with pex's default.
PIP_VERSION = "26.2.1"
#: Where the RPM puts the bundle and the helpers it runs.
LIBEXEC = "/usr/libexec/vsockproxy"
#: The RPM's command: upstream's aws-nitro-enclaves-cli owns /usr/bin/vsock-proxy.
COMMAND = "/usr/bin/vsockproxy"
#: The Python each RPM needs: AL2023's python3 is 3.9, which has no gevent wheels on aarch64.
RPM_PYTHON = {"x86_64": "python3 >= 3.9", "aarch64": "python3.11"}
#: Everything a build reads: a change to any of these makes the next run rebuild.
INPUTS = ("setup.py", "requirements.txt", "README.md", "vsockproxy/*.py", "init/*", "conf/vsock-proxy.yaml",
          "scripts/package", "scripts/package_lib/*")


def version() -> str:
    text = (REPO / "vsockproxy" / "__init__.py").read_text()
    return re.search(r'__version__ = "([^"]+)"', text).group(1)


def artifacts(dist: Path, release: str) -> list[Path]:
    """The files a build puts in ``dist``."""
    names = [f"vsock-proxy-{release}-{arch}.pyz" for arch in platforms.BUNDLES]
    names += [f"vsockproxy-{release}-1.{arch}.rpm" for arch in platforms.BUNDLES]
    return [dist / name for name in names] + [dist / "SHA256SUMS"]


def inputs_digest() -> str:
    digest = hashlib.sha256()
    for pattern in INPUTS:
        for path in sorted(REPO.glob(pattern)):
            if path.is_file() and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def run(argv: list[str], what: str) -> None:
    """Run a build step; on failure, say which step and stop (its own output is above)."""
    result = subprocess.run(argv)
    if result.returncode != 0:
        sys.exit(f"scripts/package: {what} failed (exit {result.returncode}); its output is above")


def build_project_wheel(into: Path) -> Path:
    """vsockproxy's own (pure Python) wheel, built once from a copy of the sources.

    Built here rather than by pex, which builds it once per target platform, in parallel, in
    the same source tree; the copy leaves no build/ or egg-info in the checkout.
    """
    project = into / "project"
    project.mkdir()
    for name in ("setup.py", "README.md", "requirements.txt"):
        shutil.copy2(REPO / name, project / name)
    shutil.copytree(REPO / "vsockproxy", project / "vsockproxy", ignore=shutil.ignore_patterns("__pycache__"))
    run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "--no-deps",
         "--no-build-isolation", "--wheel-dir", str(into / "wheel"), str(project)], "building vsockproxy's wheel")
    return next((into / "wheel").glob("vsockproxy-*.whl"))


def build_pyz(arch: str, project_wheel: Path, output: Path) -> None:
    """One zipapp holding the wheels of every Python ``platforms.BUNDLES[arch]`` names."""
    pythons = platforms.BUNDLES[arch]
    work = WORK / arch
    work.mkdir(parents=True)
    bundle = {"arch": arch, "pythons": [list(v) for v in pythons]}
    preamble = work / "preamble.py"
    preamble.write_text(f"_vsockproxy_bundle = {json.dumps(bundle)}\n" + (HERE / "preamble.py").read_text())
    argv = [sys.executable, "-m", "pex", "--pex-root", str(PEX_ROOT), "--pip-version", PIP_VERSION,
            "--no-build",  # wheels only: a wheel built here would be for this machine, not the target
            "--project", str(project_wheel), "-r", str(REPO / "requirements.txt"),
            "--entry-point", "vsockproxy.__main__:main", "--python-shebang", "/usr/bin/env python3",
            "--preamble-file", str(preamble), "--no-emit-warnings", "-o", str(output)]
    for python in pythons:
        complete = work / ("cp%d%d.json" % python)
        complete.write_text(json.dumps(platforms.complete_platform(arch, python)))
        argv += ["--complete-platform", str(complete)]
    print(f"scripts/package: building {output.relative_to(REPO)} (Python "
          f"{', '.join('%d.%d' % v for v in pythons)} on {arch})", file=sys.stderr)
    run(argv, f"pex for {arch}")


def unit_for_rpm(text: str, name: str) -> str:
    """The repo's unit with its /usr/local paths moved to where the RPM installs the programs."""
    text = text.replace("/usr/local/bin/vsock-proxy", COMMAND).replace("/usr/local/libexec/", LIBEXEC + "/")
    if "/usr/local/" in text:
        sys.exit(f"scripts/package: init/{name} refers to a /usr/local path the RPM does not install; "
                 "teach scripts/package_lib/build.py where it goes")
    return text


def build_rpm(arch: str, release: str, pyz: Path, output: Path) -> None:
    """The RPM for ``arch``: the zipapp, its launcher, the units, the region and replace-upstream helpers,
    logrotate, the allowlist."""
    # Outside the checkout: rpmbuild's own scripts break on a space in its paths, and a clone may have one.
    with tempfile.TemporaryDirectory(prefix=f"vsockproxy-rpm-{arch}-") as temp:
        build_rpm_in(Path(temp), arch, release, pyz, output)


def build_rpm_in(top: Path, arch: str, release: str, pyz: Path, output: Path) -> None:
    """build_rpm in the rpmbuild top directory ``top``."""
    sources = top / "SOURCES"
    (sources / "units").mkdir(parents=True)
    shutil.copy2(pyz, sources / "vsock-proxy.pyz")
    for name in ("vsockproxy", "vsockproxy-cache.conf"):
        shutil.copy2(HERE / name, sources / name)
    for name in ("vsock-proxy-region", "vsock-proxy-replace-upstream"):
        shutil.copy2(REPO / "init" / name, sources / name)
    shutil.copy2(REPO / "init" / "vsock-proxy.logrotate", sources / "vsock-proxy.logrotate")
    shutil.copy2(REPO / "conf" / "vsock-proxy.yaml", sources / "vsock-proxy.yaml")
    for unit in sorted((REPO / "init").glob("*.service")):
        (sources / "units" / unit.name).write_text(unit_for_rpm(unit.read_text(), unit.name))
    print(f"scripts/package: building {output.relative_to(REPO)}", file=sys.stderr)
    run(["rpmbuild", "-bb", "--quiet", "--target", f"{arch}-linux",
         "--define", f"_topdir {top}", "--define", f"vsockproxy_version {release}",
         "--define", f"vsockproxy_python {RPM_PYTHON[arch]}", "--define", f"vsockproxy_libexec {LIBEXEC}",
         "--define", f"vsockproxy_command {COMMAND}",
         str(HERE / "vsockproxy.spec")], f"rpmbuild for {arch}")
    built = top / "RPMS" / arch / output.name
    shutil.move(str(built), output)


def write_checksums(files: list[Path], output: Path) -> None:
    lines = [f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}\n" for path in files]
    output.write_text("".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(prog="scripts/package", description=__doc__.splitlines()[0])
    parser.add_argument("--dist", type=Path, default=REPO / "dist", help="output directory (default: dist/)")
    parser.add_argument("--force", action="store_true", help="rebuild even when no input changed")
    options = parser.parse_args()
    dist = options.dist.resolve()
    release = version()
    outputs = artifacts(dist, release)
    stamp = dist / ".package-stamp"
    digest = inputs_digest()
    if not options.force and all(p.exists() for p in outputs) and stamp.exists() and stamp.read_text() == digest:
        print(f"scripts/package: {dist} is up to date (--force rebuilds)", file=sys.stderr)
        return 0
    if check_index.main() != 0:
        return 1

    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    dist.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    for path in outputs:
        path.unlink(missing_ok=True)
    project_wheel = build_project_wheel(WORK)
    for arch in platforms.BUNDLES:
        pyz = dist / f"vsock-proxy-{release}-{arch}.pyz"
        build_pyz(arch, project_wheel, pyz)
        build_rpm(arch, release, pyz, dist / f"vsockproxy-{release}-1.{arch}.rpm")
    write_checksums(outputs[:-1], outputs[-1])
    shutil.rmtree(WORK)
    stamp.write_text(digest)
    print("scripts/package: built " + " ".join(path.name for path in outputs) + f" in {dist}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
