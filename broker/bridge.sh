#!/usr/bin/env bash
# Render a site broker's bridge to the central broker (a mosquitto `connection` block).
# With --credentials, the bridge logs in as the site and forwards only its nodes' topics.
# Usage: bash broker/bridge.sh --name SITE --remote HOST:PORT [--credentials FILE]
#        [--ca-file CA] [--out FILE]
set -euo pipefail
# The environment broker/install.sh made, if there is one.
python="$(dirname "$0")/../.venv/bin/python"
[ -x "$python" ] || python=python3
exec "$python" -m flotta_mqtt.broker bridge "$@"
