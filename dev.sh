#!/usr/bin/env bash
# qref developer entry point.  Usage: ./dev.sh {setup|test|check|bench|suite-speed} [args...]
#   setup  create .venv (if missing) and install qref editable with the test and models extras,
#          pinned by constraints.txt; skipped while .venv/.qref-stamp is current
#   test   setup, then pytest -q -n 2 --hypothesis-seed=0 [args...] (both cores; a seed
#          given in args replaces 0)
#   check  setup, then `qref check [args...]` (default: torchao-pt2e with the conformance
#          table, report in qref-report.json): the property suite against a real converter
#   bench  setup, then benchmarks/convert_speed.py [args...]
#   suite-speed  setup, then benchmarks/suite_speed.py [args...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

VENV=.venv
PY="$VENV/bin/python"
STAMP="$VENV/.qref-stamp"

stamp_value() {
    # sha256 of the files that decide what gets installed
    cat constraints.txt pyproject.toml | sha256sum | cut -d' ' -f1
}

setup() {
    if [[ ! -x "$PY" ]]; then
        echo "dev.sh: creating $VENV" >&2
        python3 -m venv "$VENV"
    fi
    local want
    want="$(stamp_value)"
    if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
        return 0
    fi
    echo "dev.sh: installing qref and its pinned dependencies into $VENV" >&2
    # Every pip call is pinned by constraints.txt (an unpinned torch would pull
    # a multi-GB CUDA build).
    "$PY" -m pip install -q --disable-pip-version-check \
        -c constraints.txt -e '.[test,models]'
    echo "$want" > "$STAMP"
}

cmd="${1:-}"
[[ $# -gt 0 ]] && shift
case "$cmd" in
    setup)
        setup
        ;;
    test)
        setup
        # Repeatable by default (CI): a fixed Hypothesis seed unless the caller gives one
        # (`./dev.sh test --hypothesis-seed=$RANDOM` explores new examples).
        seed=(--hypothesis-seed=0)
        for arg in "$@"; do [[ "$arg" == --hypothesis-seed* ]] && seed=(); done
        exec "$PY" -m pytest -q -n 2 "${seed[@]}" "$@"
        ;;
    check)
        setup
        if [[ $# -eq 0 ]]; then
            set -- torchao-pt2e --report qref-report.json
        fi
        exec "$VENV/bin/qref" check "$@"
        ;;
    suite-speed)
        setup
        exec "$PY" benchmarks/suite_speed.py "$@"
        ;;
    bench)
        setup
        exec "$PY" benchmarks/convert_speed.py "$@"
        ;;
    *)
        echo "usage: $0 {setup|test|check|bench|suite-speed} [args...]" >&2
        exit 2
        ;;
esac
