#!/usr/bin/env bash
# Set up pmd for use: build the Cython extensions in place and install the
# package with its test and benchmark extras into the current Python.
# Idempotent; on a fresh Debian 12 machine it also installs a C compiler.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if ! command -v gcc >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gcc libc6-dev
fi
# setuptools 77 or newer reads the SPDX license of pyproject.toml; in-place builds
# (python setup.py build_ext --inplace, the debug and sanitizer builds) use this one.
"$PYTHON" -m pip install -q --disable-pip-version-check "setuptools>=77"
"$PYTHON" -m pip install -q --disable-pip-version-check -e ".[test]"
