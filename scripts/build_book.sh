#!/usr/bin/env bash
# Set everything up and build the HTML book into _build/html (warnings are errors).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MTLBOOK_DATA=${MTLBOOK_DATA:-$(cd .. && pwd)/shared/data}
export PYDEVD_DISABLE_FILE_VALIDATION=1
source scripts/reproducible_env.sh
echo "== building the book"
.venv/bin/jupyter-book build . -W -n --keep-going
echo "== the book is at $(pwd)/_build/html/index.html"
