#!/usr/bin/env bash
# Install what flotta_mqtt needs from Debian (mosquitto) and PyPI (the package itself).
# Usage: bash broker/install.sh [EXTRAS]   e.g. `bash broker/install.sh test`
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v mosquitto >/dev/null && [ ! -x /usr/sbin/mosquitto ]; then
    sudo_=""
    [ "$(id -u)" -eq 0 ] || sudo_="sudo"
    $sudo_ apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq mosquitto mosquitto-clients >/dev/null
fi

extras="${1:-}"
python3 -m pip install -q --disable-pip-version-check -e ".${extras:+[$extras]}"
