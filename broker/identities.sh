#!/usr/bin/env bash
# Generate broker identities: a mosquitto password file, an ACL and credentials.json (0600)
# for a set of nodes. Run it as root on the broker host so the files go to user mosquitto.
# Usage: bash broker/identities.sh --out DIR [--scheduler NAME] [--worker NAME]...
#        [--workbench NAME]... [--dashboard NAME]... [--bridge SITE=NODE,NODE]...
set -euo pipefail
# The environment broker/install.sh made, if there is one.
python="$(dirname "$0")/../.venv/bin/python"
[ -x "$python" ] || python=python3
exec "$python" -m flotta_mqtt.broker identities "$@"
