#!/usr/bin/env bash
# The CPU run CI makes: a fresh virtual environment, then the README's test command, verbatim.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv "${VENV:-.venv}"
. "${VENV:-.venv}/bin/activate"
python -m pip install -q --upgrade pip
pip install -e ".[test]" && pytest
