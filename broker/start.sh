#!/usr/bin/env bash
# Start a development mosquitto on PORT (default 1883) with the project's settings
# (TCP_NODELAY, no per-client queue count limit, persistence), data under DIR.
# Usage: bash broker/start.sh [PORT] [DIR] [--bind ADDR] [--identities DIR] [--tls DIR]
#        [--bridge FILE]...   (see broker/README.md)
set -euo pipefail
exec python3 -m flotta_mqtt.broker start "${1:-1883}" "${2:-./broker-data}" "${@:3}"
