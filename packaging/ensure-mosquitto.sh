#!/usr/bin/env bash
# Make sure a Mosquitto broker binary is available for the demo and the integration tests.
# Installs the Debian package when missing and running as root; otherwise says what to install.
set -euo pipefail
if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then
    exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Mosquitto (Debian packages mosquitto, mosquitto-clients)..."
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq mosquitto mosquitto-clients >/dev/null
    exit 0
fi
echo "Mosquitto is required: run 'sudo apt-get install mosquitto mosquitto-clients'" \
     "(or your distribution's mosquitto package) and try again" >&2
exit 1
