#!/usr/bin/env bash
# Install the local stack's system packages on Debian when missing; a no-op when present.
set -euo pipefail

PACKAGES=(podman buildah runc docker-registry debootstrap prometheus prometheus-alertmanager
          chromium catatonit uidmap postgresql git openssh-client skopeo apache2-utils
          etcd-server xz-utils openssl)

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done

if [ ${#missing[@]} -eq 0 ]; then
    echo "system packages present: ${PACKAGES[*]}"
    exit 0
fi
if [ ! -f /etc/debian_version ]; then
    echo "missing ${missing[*]}: this script installs them on Debian only" >&2
    exit 2
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "missing ${missing[*]}: run as root" >&2; exit 2; }
    SUDO="sudo"
fi
echo "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
