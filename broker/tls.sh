#!/usr/bin/env bash
# Generate a private CA, the broker's certificate (localhost, 127.0.0.1 and each --name)
# and optional client certificates, with openssl. ca.key stays where it is made.
# Usage: bash broker/tls.sh --out DIR [--name HOST]... [--client NODE]...
set -euo pipefail
exec python3 -m flotta_mqtt.broker tls "$@"
