#!/usr/bin/env bash
# Installs what the integration tests need beyond the Rust toolchain:
#   - OpenLDAP slapd (with the ppolicy overlay module) and ldap-utils (ldapadd, ldapwhoami),
#     used by tests/tests/ldap.rs and the ldap_bench example.
# Idempotent: does nothing when slapd and ldapwhoami are already installed.
# Must run as root (or with sudo available) on Debian 12; non-interactive.
set -euo pipefail

have_all() {
    [ -x /usr/sbin/slapd ] && command -v ldapwhoami >/dev/null 2>&1 && command -v ldapadd >/dev/null 2>&1
}

if have_all; then
    echo "install-test-deps: slapd and ldap-utils already installed"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "install-test-deps: run as root (slapd and ldap-utils are missing)" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
# slapd's maintainer scripts would otherwise create and start a system instance; the tests run
# their own instances from temporary directories, so skip the default configuration.
echo "slapd slapd/no_configuration boolean true" | $SUDO debconf-set-selections 2>/dev/null || true

$SUDO apt-get update
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends slapd ldap-utils

# The package may have started a system slapd (it is not needed; the tests use their own).
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet slapd 2>/dev/null; then
    $SUDO systemctl stop slapd || true
fi

if have_all; then
    echo "install-test-deps: slapd $(/usr/sbin/slapd -VVV 2>&1 | head -n1 | tr -s ' ')"
else
    echo "install-test-deps: slapd or ldap-utils still missing after install" >&2
    exit 1
fi
