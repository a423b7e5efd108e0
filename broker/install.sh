#!/usr/bin/env bash
# Install what flotta_mqtt needs from Debian and PyPI, then the package itself, into the
# virtual environment .venv at the repo root (made if missing; run `.venv/bin/python`, or
# `source .venv/bin/activate` first).
# Usage: bash broker/install.sh [EXTRAS]   e.g. `bash broker/install.sh test`
# Debian: mosquitto (the broker) and python3-venv; with the test extra also the tools the
# fault tests use to cut and degrade links between network namespaces (iproute2, nftables),
# openssl, and podman (with runc, and busybox-static for a tiny local image) serving the Docker API
# to the docker executor's tests and running Pod specs for the kube executor's; chromium,
# in which the dashboard's end-to-end test runs, graphviz, which draws DAG pictures, and
# postgresql, whose server binaries the tests start for the scheduler's PostgreSQL database
# (tests/postgres.py runs its own, as an unprivileged user, on a free port); with the test
# extra also Node.js and npm, from which Azurite (a real Azure Storage API on loopback, for
# the store's Azure tests) is installed into .azurite at the repo root;
# with the bench extra, redis-server for the Celery peer of the benchmarks.
set -euo pipefail
cd "$(dirname "$0")/.."

extras="${1:-}"
packages=(mosquitto mosquitto-clients python3-venv)
if [[ ",$extras," == *",test,"* ]]; then
    packages+=(iproute2 nftables openssl podman runc busybox-static chromium graphviz postgresql)
    # Node.js's own packages (NodeSource's nodejs carries npm) conflict with Debian's npm.
    command -v npm >/dev/null || packages+=(nodejs npm)
fi
if [[ ",$extras," == *",bench,"* ]]; then
    packages+=(redis-server)  # Celery's broker and result backend in `python -m bench`
fi
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" \
        || missing+=("$package")
done
if (( ${#missing[@]} )); then
    sudo_=""
    [ "$(id -u)" -eq 0 ] || sudo_="sudo"
    $sudo_ apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Always a virtual environment: Debian 12's Python refuses `pip install` outside one (PEP
# 668), and one way to install everywhere is one way to test. It sees the system's site
# packages, so what the system (or Debian's python3-* packages) has is not fetched again.
[ -x .venv/bin/python ] || python3 -m venv --system-site-packages .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extras:+[$extras]}"
if [[ ",$extras," == *",test,"* ]]; then
    # Pinned: 3.36 and later ask for Node 21+, Debian 12 has Node 18.
    [ -x .azurite/node_modules/.bin/azurite-blob ] \
        || npm install --silent --no-audit --no-fund --prefix .azurite azurite@3.35.0
fi
echo "flotta_mqtt installed in $(pwd)/.venv: run .venv/bin/python, or source .venv/bin/activate"
