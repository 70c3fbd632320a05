#!/usr/bin/env bash
# The main job on the embedded synthetic data (the README's first set-up command): install the pinned requirements,
# then run scripts/demo.py: generate the synthetic dataset, verify its WebVid shards, pre-train a tiny model from
# scratch (stage 1 + stage 2), fine-tune retrieval, captioning and QA, compare the stage-1 objectives (clip, mcq,
# hmmc) and methods (membridge, t2vlp, stoa) on the same data, and write results.json + report.html.
# Usage: bash scripts/demo.sh [demo.py flags]   e.g. --output_dir runs/demo, --quick, --reuse (see --help)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1

python -m pip install -q -r requirements.txt
python scripts/demo.py "$@"
