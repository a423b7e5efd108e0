#!/usr/bin/env bash
# Generate a private CA, the broker's certificate (localhost, 127.0.0.1 and each --name)
# and optional client certificates, with openssl. ca.key stays where it is made.
# Usage: bash broker/tls.sh --out DIR [--name HOST]... [--client NODE]...
set -euo pipefail
# The environment broker/install.sh made, if there is one.
python="$(dirname "$0")/../.venv/bin/python"
[ -x "$python" ] || python=python3
exec "$python" -m flotta_mqtt.broker tls "$@"
