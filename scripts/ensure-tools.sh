#!/usr/bin/env bash
# Installs the system tools a target needs when they are missing.
# Usage: scripts/ensure-tools.sh test|bench
# As root (CI, fresh Debian) it runs apt-get; otherwise it prints one line saying what to install.
set -euo pipefail

declare -A package_of=(
    [redis-server]=redis-server
    [promtool]=prometheus
    [chromium]=chromium
    [chromedriver]=chromium-driver
    [docker-compose]=docker-compose
    [slowhttptest]=slowhttptest
    [nginx]=nginx-light
    [wrk]=wrk
    [taskset]=util-linux
)

case "${1:-test}" in
    test) wanted=(redis-server promtool chromium chromedriver docker-compose slowhttptest) ;;
    bench) wanted=(redis-server nginx wrk taskset) ;;
    *) echo "usage: $0 test|bench" >&2; exit 2 ;;
esac

missing=()
for tool in "${wanted[@]}"; do
    if ! command -v "$tool" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$tool" ]; then
        missing+=("${package_of[$tool]}")
    fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing with apt-get: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # Debian starts services on install; the tests start their own on free ports.
    for svc in redis-server nginx; do
        if command -v service >/dev/null 2>&1; then service "$svc" stop >/dev/null 2>&1 || true; fi
    done
else
    echo "missing tools: install the Debian packages: ${missing[*]}" >&2
    exit 1
fi
