#!/usr/bin/env bash
# Sets up a fresh machine and runs the whole test suite (README.md's test command).
set -euo pipefail
cd "$(dirname "$0")/.."
# A plain `torch` requirement would pull a multi-GB CUDA build on a machine without CUDA:
# install the CPU wheel first, then the rest (which that torch already satisfies).
if ! command -v nvidia-smi >/dev/null 2>&1; then
  python -m pip install --quiet torch==2.13.0
fi
python -m pip install --quiet -r requirements-dev.txt
# The browser test drives Debian's Chromium (Playwright's own browser download cannot work here).
if ! command -v chromium >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python -m pytest "$@"
