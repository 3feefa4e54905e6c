#!/usr/bin/env bash
# One entry point for the two README commands:
#   ./run.sh demo   runs the main job: synthetic corpus, tiny-model pretraining on the CPU, report
#   ./run.sh test   runs ruff and the test suite
# Each creates (or reuses) .venv and installs the pinned, tested stack from constraints.txt.
#   ./run.sh test-fairseq2   the fairseq2 parity tests (tests_fairseq2/) and the default test tier in
#                            .venv-fairseq2, the fairseq2 environment of constraints-fairseq2.txt (torch 2.9.1)
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
cmd=${1:-}
shift || true
CONSTRAINTS=constraints.txt
EXTRAS=dev
if [ "$cmd" = test-fairseq2 ]; then
    CONSTRAINTS=constraints-fairseq2.txt
    EXTRAS=fairseq2,dev
    VENV=${VENV_FAIRSEQ2:-.venv-fairseq2}
    # fairseq2n loads the system's libsndfile.
    if ! ldconfig -p 2>/dev/null | grep -q 'libsndfile\.so\.1'; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            (apt-get update -qq && apt-get install -y -qq libsndfile1) >/dev/null
        else
            echo "run.sh: fairseq2 needs libsndfile (on Debian/Ubuntu: apt-get install libsndfile1)" >&2; exit 1
        fi
    fi
fi
VENV=${VENV:-.venv}
stamp="$VENV/.installed"
want="$(cat "$CONSTRAINTS" pyproject.toml | sha256sum | cut -d' ' -f1)"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
        { echo "run.sh: needs Python 3.10 or newer as $PYTHON (set PYTHON=...)" >&2; exit 1; }
    "$PYTHON" -m venv "$VENV" ||
        { echo "run.sh: could not create $VENV (on Debian/Ubuntu: apt-get install python3-venv)" >&2; exit 1; }
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -c "$CONSTRAINTS" -e ".[$EXTRAS]"
    # The reference Zipformer for the parity tests: its wheel pins torch<2.8 and pulls training
    # tools, but its encoder modules need only torch, so it goes in without dependencies.
    "$VENV/bin/python" -m pip install -q --no-deps -c "$CONSTRAINTS" zipformer
    echo "$want" > "$stamp"
fi
export PATH="$(cd "$VENV" && pwd)/bin:$PATH"

case "$cmd" in
    demo)
        exec python -m pretrain.demo "$@"
        ;;
    test)
        ruff check .
        exec python -m pytest "$@"
        ;;
    test-fairseq2)
        exec python -m pytest tests_fairseq2 tests "$@"
        ;;
    *)
        echo "usage: ./run.sh demo|test|test-fairseq2 [args...]" >&2
        exit 2
        ;;
esac
