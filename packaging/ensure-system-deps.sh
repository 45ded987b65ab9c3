#!/usr/bin/env bash
# Make sure the system tools the demo and the integration tests use are present: Mosquitto (the
# MQTT broker), dcmtk (storescu/storescp, the real DICOM peers), systemd-analyze (the unit
# checks), chromium (the report's rendering test), strace (the store's sync test),
# zabbix-agent2 (the monitoring snippet's test runs the agent Debian ships) and tinyproxy (an
# HTTP CONNECT proxy like a hospital's, for the MQTT-over-proxy test). Installs the Debian
# packages when missing and running as root; otherwise says exactly what to install.
set -euo pipefail
missing=()
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    missing+=(mosquitto)
fi
if ! command -v mosquitto_sub >/dev/null 2>&1; then
    missing+=(mosquitto-clients)
fi
if ! command -v storescu >/dev/null 2>&1; then
    missing+=(dcmtk)
fi
if ! command -v systemd-analyze >/dev/null 2>&1; then
    missing+=(systemd)
fi
if ! /usr/bin/python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    missing+=(python3-venv)  # `make deb` builds the package's environment on Debian's python3
fi
if ! command -v dpkg-deb >/dev/null 2>&1; then
    missing+=(dpkg)
fi
if ! command -v chromium >/dev/null 2>&1; then
    missing+=(chromium)  # renders the HTML report headless in its test
fi
if ! command -v strace >/dev/null 2>&1; then
    missing+=(strace)  # the store's durability test checks which sync calls it makes
fi
if ! command -v zabbix_agent2 >/dev/null 2>&1 && [ ! -x /usr/sbin/zabbix_agent2 ]; then
    missing+=(zabbix-agent2)  # docs/monitoring.md's Zabbix snippet is tested against it
fi
if ! command -v tinyproxy >/dev/null 2>&1; then
    missing+=(tinyproxy)  # the hospital HTTP proxy stand-in of the MQTT-over-proxy test
fi
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian packages: ${missing[*]} ..."
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
    if [[ " ${missing[*]} " == *" zabbix-agent2 "* ]] && command -v systemctl >/dev/null 2>&1; then
        # the test runs its own agent; the package's system service is not wanted here
        systemctl disable --now zabbix-agent2.service >/dev/null 2>&1 || true
    fi
    if [[ " ${missing[*]} " == *" tinyproxy "* ]] && command -v systemctl >/dev/null 2>&1; then
        systemctl disable --now tinyproxy.service >/dev/null 2>&1 || true  # tests run their own
    fi
    exit 0
fi
echo "missing system packages: run 'sudo apt-get install ${missing[*]}' and try again" >&2
exit 1
