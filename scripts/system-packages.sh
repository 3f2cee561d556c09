#!/usr/bin/env bash
# The Debian packages the test suite needs beyond Python: PostgreSQL's server binaries (the store
# tests start a throwaway PostgreSQL of their own), chromium (the web page's browser tests) and
# prometheus (promtool checks the shipped alert rules; the monitoring tests run a Prometheus).
# Installs what is missing when it can (root, or passwordless sudo, and apt-get); otherwise says
# exactly which tests will skip and why, and how to install them. Never fails the caller: the
# tests that need a missing package skip with the same reason.
set -uo pipefail
export DEBIAN_FRONTEND=noninteractive
# Where to look for the installed packages: / unless a test points it elsewhere.
root=${SYSTEM_PACKAGES_ROOT:-}

have_postgres() {
    local bin
    for bin in "$root"/usr/lib/postgresql/*/bin; do
        [[ -x $bin/initdb && -x $bin/pg_ctl && -x $bin/postgres ]] && return 0
    done
    command -v initdb >/dev/null && command -v pg_ctl >/dev/null && command -v postgres >/dev/null
}
have_chromium() { [[ -x $root/usr/bin/chromium ]]; }
have_prometheus() { [[ -x $root/usr/bin/promtool && -x $root/usr/bin/prometheus ]]; }

missing=()
have_postgres || missing+=(postgresql)
have_chromium || missing+=(chromium)
have_prometheus || missing+=(prometheus)
[[ ${#missing[@]} -eq 0 ]] && exit 0

declare -A what=([postgresql]="the PostgreSQL store tests" [chromium]="the browser tests of the web page"
                 [prometheus]="the checks of the Prometheus rules and service discovery")
declare -A pkgs=([postgresql]="postgresql" [chromium]="chromium fonts-liberation" [prometheus]="prometheus")

skip() {  # $1: why nothing can be installed
    local name
    for name in "${missing[@]}"; do
        echo "system-packages: $name is missing and $1: ${what[$name]} will SKIP" \
             "(install it with: sudo apt-get install ${pkgs[$name]})" >&2
    done
    exit 0
}

sudo=()
if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null && sudo -n true 2>/dev/null || skip "this user is not root and has no passwordless sudo"
    sudo=(sudo -n)
fi
command -v apt-get >/dev/null || skip "there is no apt-get on this machine"

# Do not start the distribution's own PostgreSQL or Prometheus server during the install (the
# tests start their own; --no-install-recommends also leaves out prometheus-node-exporter): a
# policy that forbids starting services, removed when the install ends.
policy=/usr/sbin/policy-rc.d
if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null
    "${sudo[@]}" chmod 755 "$policy"
    trap '"${sudo[@]}" rm -f "$policy"' EXIT
fi

list=()
for name in "${missing[@]}"; do
    read -ra parts <<<"${pkgs[$name]}"
    list+=("${parts[@]}")
done
started=$SECONDS
echo "system-packages: installing ${list[*]} (missing: ${missing[*]}; apt-get, a minute or two)"
if ! "${sudo[@]}" apt-get update -q || ! "${sudo[@]}" apt-get install -y -q --no-install-recommends "${list[@]}"; then
    skip "apt-get could not install it (see its output above)"
fi
echo "system-packages: installed in $((SECONDS - started))s"
