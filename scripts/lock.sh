#!/usr/bin/env bash
# Refresh both locks (`make lock`; see CONTRIBUTING.md, "Refreshing the locks"):
#   requirements.lock                  from requirements.txt (pip-compile --generate-hashes)
#   scripts/vendor/package-lock.json   from scripts/vendor/package.json (npm, integrity hashes)
# By default every package keeps its locked version unless requirements.txt / package.json
# no longer allow it (new dependencies are added at their newest allowed release).
# UPGRADE=1 moves every package to its newest allowed release.
# pip-tools runs from a throwaway venv; it is not a requirement of the project.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP_TOOLS=pip-tools==7.6.2
upgrade=${UPGRADE:-0}

tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
echo "== $PIP_TOOLS in a throwaway venv"
"$PY" -m venv "$tools/venv"
"$tools/venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip "$PIP_TOOLS" \
  2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)

echo "== requirements.lock (upgrade=$upgrade)"
args=(--quiet --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links)
[ "$upgrade" = 1 ] && args+=(--upgrade)
# the local wheel directory and extra indexes come from pip's own configuration (pip config list)
CUSTOM_COMPILE_COMMAND="make lock" "$tools/venv/bin/pip-compile" "${args[@]}" \
  -o requirements.lock requirements.txt 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)

# the CPU torch wheel and nothing from CUDA
if grep -qiE '^(nvidia-|triton)' requirements.lock; then
  echo "lock.sh: requirements.lock pulls CUDA packages:" >&2
  grep -iE '^(nvidia-|triton)' requirements.lock >&2
  echo "lock.sh: torch must resolve to the CPU wheel (torch==X+cpu); check pip's find-links" >&2
  exit 1
fi
grep -qE '^torch==[0-9.]+\+cpu ' requirements.lock || {
  echo "lock.sh: torch in requirements.lock is not a +cpu build: $(grep '^torch==' requirements.lock)" >&2; exit 1; }

echo "== scripts/vendor/package-lock.json (upgrade=$upgrade)"
(
  cd scripts/vendor
  [ "$upgrade" = 1 ] && rm -f package-lock.json
  npm install --package-lock-only --ignore-scripts --no-audit --no-fund --loglevel=error
)

echo "== locks refreshed: $(grep -cE '^[A-Za-z0-9]' requirements.lock) Python packages," \
     "$(node -e 'const l=require("./scripts/vendor/package-lock.json");console.log(Object.keys(l.packages).filter(Boolean).length)') npm packages"
echo "   before committing: git diff the locks, then run the unit tests, strict nbval on every chapter,"
echo "   the book build and the browser tests (\`make test\`) on a venv set up from the new lock."
