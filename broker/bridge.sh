#!/usr/bin/env bash
# Render a site broker's bridge to the central broker (a mosquitto `connection` block).
# With --credentials, the bridge logs in as the site and forwards only its nodes' topics.
# Usage: bash broker/bridge.sh --name SITE --remote HOST:PORT [--credentials FILE]
#        [--ca-file CA] [--out FILE]
set -euo pipefail
exec python3 -m flotta_mqtt.broker bridge "$@"
