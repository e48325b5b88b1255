#!/usr/bin/env bash
# Set everything up for mtlbook; safe to run again (each step is skipped when done).
#   1. .venv with the pinned requirements and the package (editable)
#   2. MathJax, RequireJS and the widget manager vendored from the npm registry into
#      book/_vendor/vendor, so the built HTML renders math and widgets offline
#   3. with --browser: Debian's chromium for the browser tests (when apt-get is usable)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}

want_browser=0
for arg in "$@"; do
  case "$arg" in
    --browser) want_browser=1 ;;
    *) echo "setup.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

# 1. virtual environment ------------------------------------------------------------
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.mtlbook-installed
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "== installing requirements (torch pinned to the CPU build) and mtlbook"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
  echo "$want" > "$stamp"
fi

# 2. vendored JavaScript ---------------------------------------------------------------
VENDOR=book/_vendor/vendor
MATHJAX=3.2.2 REQUIREJS=2.3.8 HTMLMANAGER=1.0.15 VENDOR_LAYOUT=2
vstamp="$VENDOR/.versions"
vwant="mathjax@$MATHJAX requirejs@$REQUIREJS html-manager@$HTMLMANAGER layout@$VENDOR_LAYOUT"
if [ ! -f "$vstamp" ] || [ "$(cat "$vstamp")" != "$vwant" ]; then
  if ! command -v npm >/dev/null 2>&1; then
    echo "setup.sh: npm is needed to vendor MathJax/RequireJS/widgets (install Node.js + npm)" >&2
    exit 1
  fi
  echo "== vendoring $vwant from the npm registry"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && npm install --silent --no-audit --no-fund --ignore-scripts \
      "mathjax@$MATHJAX" "requirejs@$REQUIREJS" "@jupyter-widgets/html-manager@$HTMLMANAGER" >/dev/null)
  rm -rf "$VENDOR" && mkdir -p "$VENDOR/requirejs" "$VENDOR/html-manager"
  cp -r "$tmp/node_modules/mathjax/es5" "$VENDOR/mathjax"
  cp "$tmp/node_modules/requirejs/require.js" "$VENDOR/requirejs/require.js"
  # the AMD bundle is self-contained (base + controls); its fonts sit beside it
  find "$tmp/node_modules/@jupyter-widgets/html-manager/dist" -maxdepth 1 -type f \
      ! -name '*.map' ! -name 'libembed*' ! -name 'embed.js*' -exec cp {} "$VENDOR/html-manager/" \;
  # the bundle asks for its icon fonts under @jupyter-widgets/html-manager/dist/ relative
  # to the page; every chapter page lives in book/, so put a copy there
  fonts="book/_vendor/book/@jupyter-widgets/html-manager/dist"
  rm -rf book/_vendor/book && mkdir -p "$fonts"
  find "$VENDOR/html-manager" -maxdepth 1 -type f \( -name '*.woff*' -o -name '*.ttf' -o -name '*.eot' -o -name '*.svg' \) \
      -exec cp {} "$fonts/" \;
  echo "$vwant" > "$vstamp"
fi

# 3. browser for the browser tests (optional) ------------------------------------------
if [ "$want_browser" = 1 ] && ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "== installing Debian's chromium for the browser tests"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }; then
      echo "setup.sh: could not install chromium; browser tests will be skipped" >&2
    fi
  else
    echo "setup.sh: chromium not found and apt-get not usable; browser tests will be skipped" >&2
  fi
fi
echo "== setup done ($ROOT/.venv)"
