#!/usr/bin/env bash
# One entry point for the two README commands:
#   ./run.sh demo   runs the main job: synthetic corpus, tiny-model pretraining on the CPU, report
#   ./run.sh test   runs ruff and the test suite
# Each creates (or reuses) .venv and installs the pinned, tested stack from constraints.txt.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp="$VENV/.installed"
want="$(cat constraints.txt pyproject.toml | sha256sum | cut -d' ' -f1)"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
        { echo "run.sh: needs Python 3.10 or newer as $PYTHON (set PYTHON=...)" >&2; exit 1; }
    "$PYTHON" -m venv "$VENV" ||
        { echo "run.sh: could not create $VENV (on Debian/Ubuntu: apt-get install python3-venv)" >&2; exit 1; }
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[dev]"
    # The reference Zipformer for the parity tests: its wheel pins torch<2.8 and pulls training
    # tools, but its encoder modules need only torch, so it goes in without dependencies.
    "$VENV/bin/python" -m pip install -q --no-deps -c constraints.txt zipformer
    echo "$want" > "$stamp"
fi
export PATH="$(cd "$VENV" && pwd)/bin:$PATH"

cmd=${1:-}
shift || true
case "$cmd" in
    demo)
        exec python -m pretrain.demo "$@"
        ;;
    test)
        ruff check .
        exec python -m pytest "$@"
        ;;
    *)
        echo "usage: ./run.sh demo|test [args...]" >&2
        exit 2
        ;;
esac
