#!/usr/bin/env bash
# Starts the backend the way a host starts an external gRPC backend:
#   local-ai --external-grpc-backends insightface:/path/to/checkout/run.sh
# The host runs this file with `--addr HOST:PORT`; every argument is passed through to backend.py.
# Works from any working directory; `make install` keeps the environment up to date first.
set -euo pipefail
here="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)"
# A no-op when the environment is up to date; after a pull it brings new requirements and stubs.
make -s -C "$here" --no-print-directory install >&2
exec "$here/.venv/bin/python" "$here/backend.py" "$@"
