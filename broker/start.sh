#!/usr/bin/env bash
# Start mosquitto on PORT (default 1883) with the project's settings (TCP_NODELAY, no
# per-client queue count limit, persistence), data under DIR: passwords required
# (--identities), or --anonymous for development on loopback; --tls adds certificates,
# and any address other than loopback needs both identities and TLS.
# Usage: bash broker/start.sh [PORT] [DIR] (--identities DIR | --anonymous) [--bind ADDR]
#        [--tls DIR]
#        [--websockets PORT [--websockets-bind ADDR]] [--bridge FILE]...
#        (see README.md, "A broker for a deployment", and broker/README.md)
set -euo pipefail
# The environment broker/install.sh made, if there is one.
python="$(dirname "$0")/../.venv/bin/python"
[ -x "$python" ] || python=python3
exec "$python" -m flotta_mqtt.broker start "${1:-1883}" "${2:-./broker-data}" "${@:3}"
