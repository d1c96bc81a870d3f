#!/usr/bin/env bash
# The whole recipe in one command (PT -> SFT -> RM -> PPO, SFT -> DPO, SFT -> ORPO) and a report.
# Flags are passed to run_pipeline.py (python run_pipeline.py --help); --expand_vocab adds domain vocabulary
# expansion before PT (a merged tokenizer, PT training embed_tokens,lm_head).
set -euo pipefail
cd "$(dirname "$0")"
. scripts/launch.sh
exec "$PYTHON" run_pipeline.py "$@"
