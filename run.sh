#!/usr/bin/env bash
# Starts the backend the way a host starts an external gRPC backend:
#   local-ai --external-grpc-backends insightface:/path/to/checkout/run.sh
# The host runs this file with `--addr HOST:PORT`; every argument is passed through to backend.py.
# Works from any working directory; the first start installs the environment (`make install`).
set -euo pipefail
here="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)"
if [ ! -x "$here/.venv/bin/python" ] || [ ! -f "$here/backend_pb2.py" ]; then
    make -C "$here" --no-print-directory install >&2
fi
exec "$here/.venv/bin/python" "$here/backend.py" "$@"
