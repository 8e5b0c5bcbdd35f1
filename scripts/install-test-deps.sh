#!/usr/bin/env bash
# Installs the real peers the integration tests run against, from Debian's packages, when absent:
#   - OpenLDAP slapd (with the ppolicy overlay) and ldap-utils (ldapadd, ldapwhoami):
#     tests/tests/ldap.rs and the ldap_bench example;
#   - FreeRDP's shadow server (freerdp2-shadow-x11: freerdp-shadow-cli), winpr-utils
#     (winpr-hash, for its SAM file) and Xvfb: tests/tests/nla_shadow.rs, tests/tests/guard.rs;
#   - PostgreSQL (initdb, pg_ctl, psql; the tests start their own clusters): tests/tests/store.rs;
#   - Samba as an AD DC (samba, samba-ad-dc, samba-ad-provision; the tests provision their own
#     in a temporary directory, KDC on 127.0.0.1:88) and faketime (the plugin's clock ahead of
#     the KDC's): tests/tests/kerberos.rs;
#   - rsyslog with its GnuTLS driver (rsyslog, rsyslog-gnutls; the tests start their own with a
#     TLS listener): tests/tests/siem.rs;
#   - Prometheus' promtool (prometheus): tests/tests/observability.rs checks the alert rules.
# Idempotent: installs nothing when every tool is present. Non-interactive; needs root (or sudo).
set -euo pipefail

missing=()
[ -x /usr/sbin/slapd ] || missing+=(slapd)
command -v ldapwhoami >/dev/null 2>&1 && command -v ldapadd >/dev/null 2>&1 || missing+=(ldap-utils)
command -v freerdp-shadow-cli >/dev/null 2>&1 || missing+=(freerdp2-shadow-x11)
command -v winpr-hash >/dev/null 2>&1 || missing+=(winpr-utils)
command -v Xvfb >/dev/null 2>&1 || missing+=(xvfb)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
command -v runuser >/dev/null 2>&1 || missing+=(util-linux)
command -v samba >/dev/null 2>&1 || missing+=(samba samba-ad-dc)
[ -d /usr/share/samba/setup/ad-schema ] || missing+=(samba-ad-provision)
command -v faketime >/dev/null 2>&1 || missing+=(faketime)
[ -x /usr/sbin/rsyslogd ] || missing+=(rsyslog)
ls /usr/lib/*/rsyslog/lmnsd_gtls.so >/dev/null 2>&1 || missing+=(rsyslog-gnutls)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)

if [ ${#missing[@]} -eq 0 ]; then
    echo "install-test-deps: slapd, ldap-utils, freerdp-shadow-cli, winpr-hash, Xvfb, PostgreSQL, Samba, rsyslog and promtool already installed"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "install-test-deps: run as root (missing: ${missing[*]})" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
# slapd's maintainer scripts would otherwise create and start a system instance; the tests run
# their own instances from temporary directories.
echo "slapd slapd/no_configuration boolean true" | $SUDO debconf-set-selections 2>/dev/null || true

echo "install-test-deps: installing ${missing[*]}"
$SUDO apt-get update
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"

# A system slapd or PostgreSQL cluster the packages may have started is not needed.
if command -v systemctl >/dev/null 2>&1; then
    for unit in slapd postgresql samba-ad-dc smbd nmbd rsyslog prometheus; do
        if systemctl is-active --quiet "$unit" 2>/dev/null; then
            $SUDO systemctl stop "$unit" || true
        fi
    done
fi

for tool in /usr/sbin/slapd ldapwhoami ldapadd freerdp-shadow-cli winpr-hash Xvfb /usr/sbin/rsyslogd promtool; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "install-test-deps: $tool still missing after install" >&2
        exit 1
    fi
done
if ! command -v samba >/dev/null 2>&1 || [ ! -d /usr/share/samba/setup/ad-schema ]; then
    echo "install-test-deps: Samba AD DC still missing after install" >&2
    exit 1
fi
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    echo "install-test-deps: PostgreSQL's initdb still missing after install" >&2
    exit 1
fi
echo "install-test-deps: ready ($(/usr/sbin/slapd -VVV 2>&1 | head -n1 | tr -s ' '))"
