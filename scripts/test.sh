#!/usr/bin/env bash
# Install the pinned requirements and run the test suite (the README's second set-up command).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -r requirements.txt -r requirements-dev.txt
export HF_HUB_OFFLINE=1
python -m pytest -q tests "$@"
