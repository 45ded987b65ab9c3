#!/usr/bin/env bash
# `make deb`: dist/fedsilo_<version>_<arch>.deb. The agent and its Python dependencies live in
# a virtual environment under /opt/fedsilo/venv, built on Debian's own python3 (so the package
# depends on nothing but python3 of the same minor version); /usr/bin/fedsilo points into it;
# example configs are conffiles in /etc/fedsilo; the systemd units go to /lib/systemd/system; a
# system user `fedsilo` is created on install and removed on purge.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/dist}
py=/usr/bin/python3
version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$root/agent/__init__.py")
pyver=$($py -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
next=$($py -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1] + 1}")')
arch=$(dpkg --print-architecture)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
venv=$stage/opt/fedsilo/venv

echo "[1/4] virtual environment on $py ($pyver) with fedsilo $version ..."
$py -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q "$root"
# The environment was built in the staging directory; it will live in /opt/fedsilo/venv.
grep -rlI --null "$stage" "$venv/bin" "$venv/pyvenv.cfg" | xargs -0 sed -i "s#$stage##g"
find "$venv" -name '__pycache__' -prune -exec rm -rf {} +   # compiled again on the host

echo "[2/4] files ..."
install -d "$stage/usr/bin" "$stage/etc/fedsilo" "$stage/lib/systemd/system" \
    "$stage/usr/share/doc/fedsilo/examples" "$stage/DEBIAN"
ln -s /opt/fedsilo/venv/bin/fedsilo "$stage/usr/bin/fedsilo"
install -m 0644 "$root"/packaging/examples/{site,coordinator,plan}.toml "$stage/etc/fedsilo/"
install -m 0644 "$root"/packaging/systemd/fedsilo-{site,coordinator}.service \
    "$stage/lib/systemd/system/"
install -m 0644 "$root"/packaging/systemd/examples/*.conf "$stage/usr/share/doc/fedsilo/examples/"
install -m 0644 "$root"/README.md "$root"/docs/security.md "$root"/docs/monitoring.md \
    "$stage/usr/share/doc/fedsilo/"
# the hardware profiles sit beside the agent package, where it looks for them
cp -r "$root/hardware_profiles" "$venv/lib/python$pyver/site-packages/"

echo "[3/4] control files ..."
size=$(du -sk "$stage" | cut -f1)
cat > "$stage/DEBIAN/control" <<EOF
Package: fedsilo
Version: $version
Architecture: $arch
Maintainer: fedsilo developers <fedsilo@localhost>
Depends: python3 (>= $pyver), python3 (<< $next), adduser
Installed-Size: $size
Section: science
Priority: optional
Description: federated learning agent for hospitals
 Trains stroke-outcome models across hospitals without pooling patient data:
 each hospital runs a site agent (DICOM and clinical tables in, signed and
 compressed model updates out over MQTT), one host runs the coordinator.
EOF
printf '/etc/fedsilo/site.toml\n/etc/fedsilo/coordinator.toml\n/etc/fedsilo/plan.toml\n' \
    > "$stage/DEBIAN/conffiles"
cat > "$stage/DEBIAN/postinst" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
    if ! getent passwd fedsilo >/dev/null; then
        adduser --system --group --quiet --home /var/lib/fedsilo --no-create-home \
            --gecos "fedsilo agent" fedsilo >/dev/null
    fi
    if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
fi
exit 0
EOF
cat > "$stage/DEBIAN/prerm" <<'EOF'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl stop fedsilo-site.service fedsilo-coordinator.service >/dev/null 2>&1 || true
fi
exit 0
EOF
cat > "$stage/DEBIAN/postrm" <<'EOF'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
if [ "$1" = purge ]; then
    rm -rf /var/lib/fedsilo /var/cache/fedsilo /opt/fedsilo
    if getent passwd fedsilo >/dev/null; then deluser --system --quiet fedsilo >/dev/null 2>&1 || true; fi
    if getent group fedsilo >/dev/null; then delgroup --system fedsilo >/dev/null || true; fi
fi
exit 0
EOF
chmod 0755 "$stage"/DEBIAN/{postinst,prerm,postrm}

echo "[4/4] dpkg-deb ..."
mkdir -p "$out"
deb="$out/fedsilo_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zzstd -z3 --build "$stage" "$deb" >/dev/null
echo "$deb"
