#!/usr/bin/env bash
# Installs the system tools a target needs when they are missing.
# Usage: scripts/ensure-tools.sh test|bench|bench-instr
# As root with apt-get (CI, a fresh Debian) it installs them; otherwise it stops with the
# exact apt-get line to run, so `make test` never runs with a tool silently missing.
set -euo pipefail

declare -A package_of=(
    [redis-server]=redis-server
    [redis-sentinel]=redis-sentinel
    [redis-cli]=redis-tools
    [haproxy]=haproxy
    [promtool]=prometheus
    [chromium]=chromium
    [chromedriver]=chromium-driver
    [docker-compose]=docker-compose
    [slowhttptest]=slowhttptest
    [nginx]=nginx-light
    [wrk]=wrk
    [taskset]=util-linux
    [valgrind]=valgrind
)
# Services Debian starts on install; the tests start their own on free ports.
declare -A service_of=([redis-server]=redis-server [redis-sentinel]=redis-sentinel
                       [nginx]=nginx [haproxy]=haproxy [promtool]=prometheus)

case "${1:-test}" in
    test) wanted=(redis-server redis-sentinel redis-cli haproxy promtool chromium chromedriver
                  docker-compose slowhttptest) ;;
    bench) wanted=(redis-server nginx wrk taskset) ;;
    bench-instr) wanted=(nginx wrk valgrind) ;;
    *) echo "usage: $0 test|bench|bench-instr" >&2; exit 2 ;;
esac

missing_tools=()
missing=()
for tool in "${wanted[@]}"; do
    if ! command -v "$tool" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$tool" ]; then
        missing_tools+=("$tool")
        missing+=("${package_of[$tool]}")
    fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "missing tools (${missing_tools[*]}): run  sudo apt-get install -y ${missing[*]}" >&2
    exit 1
fi

echo "installing with apt-get: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# Stop only the services of packages this run installed (Debian starts them on install): a
# service the user already had running is never touched.
for tool in "${missing_tools[@]}"; do
    svc=${service_of[$tool]:-}
    [ -n "$svc" ] || continue
    if command -v service >/dev/null 2>&1; then service "$svc" stop >/dev/null 2>&1 || true; fi
done
