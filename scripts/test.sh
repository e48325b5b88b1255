#!/usr/bin/env bash
# Set everything up and run every test: the installed packages against requirements.lock,
# unit tests, every chapter under strict nbval, the book build with warnings as errors, and
# the browser tests on the built book.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --browser || exit 1
export MTLBOOK_DATA=${MTLBOOK_DATA:-$(cd .. && pwd)/shared/data}
export PYDEVD_DISABLE_FILE_VALIDATION=1
source scripts/reproducible_env.sh
PYTEST=(.venv/bin/python -m pytest -p no:cacheprovider)
status=0

# pytest exits 5 when it collects nothing: not a failure while a suite is empty.
run_step() {
  local name=$1; shift
  echo "== $name"
  local start=$SECONDS
  "$@"; local rc=$?
  if [ $rc -eq 5 ]; then echo "(no tests collected in: $name)"; rc=0; fi
  echo "== $name: exit $rc in $((SECONDS - start)) s"
  [ $rc -eq 0 ] || status=1
}

run_step "installed packages = requirements.lock (pip freeze)" .venv/bin/python scripts/lockcheck.py
run_step "unit tests" "${PYTEST[@]}" tests -m "not browser and not wheel" -q
# a wheel installed (not editable) into a fresh venv outside the repository runs every chapter
run_step "chapters from the wheel, outside the repository" "${PYTEST[@]}" tests -m wheel -q
shopt -s nullglob
notebooks=(book/*.ipynb)
if [ ${#notebooks[@]} -gt 0 ]; then
  run_step "chapters under strict nbval" "${PYTEST[@]}" --nbval --nbval-current-env \
    --nbval-sanitize-with .nbval-sanitize.cfg --nbval-cell-timeout=300 -q "${notebooks[@]}"
fi
run_step "book build (-W -n --keep-going)" bash scripts/build_book.sh
run_step "browser tests" "${PYTEST[@]}" tests -m browser -q -rs
if [ $status -eq 0 ]; then echo "== all test steps passed"; else echo "== some test steps FAILED"; fi
exit $status
