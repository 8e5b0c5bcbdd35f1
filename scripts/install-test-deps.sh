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

# ---------------------------------------------------------------------------------------------
# NLA tests (tests/tests/nla_shadow.rs): FreeRDP's shadow server as a real CredSSP/NLA target,
# run under Xvfb, with accounts in a SAM file made by winpr-hash.
#   freerdp2-shadow-x11 -> /usr/bin/freerdp-shadow-cli
#   winpr-utils         -> /usr/bin/winpr-hash
#   xvfb                -> /usr/bin/Xvfb
# Idempotent: installs only what is missing.
# ---------------------------------------------------------------------------------------------
nla_have_all() {
    command -v freerdp-shadow-cli >/dev/null 2>&1 && command -v winpr-hash >/dev/null 2>&1 \
        && command -v Xvfb >/dev/null 2>&1
}

if nla_have_all; then
    echo "install-test-deps: freerdp-shadow-cli, winpr-hash and Xvfb already installed"
else
    NLA_SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then
            NLA_SUDO="sudo"
        else
            echo "install-test-deps: run as root (freerdp2-shadow-x11, winpr-utils or xvfb missing)" >&2
            exit 1
        fi
    fi
    $NLA_SUDO apt-get update
    $NLA_SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        freerdp2-shadow-x11 winpr-utils xvfb
    if nla_have_all; then
        echo "install-test-deps: $(freerdp-shadow-cli /version 2>&1 | grep -o 'version [^ ]*' | head -n1 || true)"
    else
        echo "install-test-deps: freerdp-shadow-cli, winpr-hash or Xvfb still missing after install" >&2
        exit 1
    fi
fi
