#!/usr/bin/env bash
# Regenerate requirements/lock.txt, the exact set the README's set-up commands and .ci/run install (as pip constraints),
# from pyproject.toml's ranges with pip-tools: `pip install pip-tools && bash requirements/compile.sh [--upgrade]`.
# torch resolves to the local CPU wheel (2.13.0+cpu); its pin is written without the local label so that the same
# file constrains PyPI's torch 2.13.0 on other machines.
set -euo pipefail
cd "$(dirname "$0")/.."
pip-compile -q --extra test --strip-extras --no-emit-find-links --no-emit-index-url --no-emit-trusted-host \
    --output-file requirements/lock.txt "$@" pyproject.toml
sed -i -E 's/^(torch==[^+ ]+)\+[a-z0-9.]+$/\1/' requirements/lock.txt
