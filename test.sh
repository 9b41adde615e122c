#!/usr/bin/env bash
# Runs the unittest suite with the project's virtualenv (see test.py for the rules).
set -euo pipefail
cd "$(dirname "$0")"
exec .venv/bin/python test.py "$@"
