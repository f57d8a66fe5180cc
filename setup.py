"""Packaging for vsockproxy: ``pip install .`` gives the ``vsock-proxy`` command."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "vsockproxy" / "__init__.py").read_text()).group(1)
REQUIREMENTS = [line.strip() for line in (HERE / "requirements.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#")]

setup(
    name="vsockproxy",
    version=VERSION,
    description="Drop-in Python vsock-proxy for AWS Nitro Enclaves: vsock to allowlisted TCP endpoints",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(include=["vsockproxy", "vsockproxy.*"]),
    install_requires=REQUIREMENTS,
    entry_points={"console_scripts": ["vsock-proxy = vsockproxy.__main__:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Operating System :: POSIX :: Linux",
        "Topic :: System :: Networking",
    ],
)
