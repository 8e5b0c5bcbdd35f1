//! The cause catalog: every finding carries one cause from this table.
//!
//! The numbers and names are a public contract (gateways switch on them, the security team
//! filters on them): append only, never renumber, never reuse. This file is the one place where
//! the catalog lives; the proto enum and `docs/causes.md` are generated from it and a test fails
//! when they disagree (`UPDATE_GENERATED=1 cargo test -p rdp-preflight catalog` rewrites them).

use std::fmt;

/// Default severity of a cause. Operators may override it per cause in config.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The session may go ahead; the finding is reported.
    Warn,
    /// The session is stopped.
    Deny,
}

/// Who fixes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Owner {
    /// Network / firewall team.
    Net,
    /// The target's Windows administrator.
    Server,
    /// Directory (AD) administrator.
    Dir,
    /// PAM administrator: the stored credential.
    Vault,
    /// Gateway / plugin operator.
    Gw,
}

impl Owner {
    /// The catalog's short name (`net`, `server`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Owner::Net => "net",
            Owner::Server => "server",
            Owner::Dir => "dir",
            Owner::Vault => "vault",
            Owner::Gw => "gw",
        }
    }
}

/// The stage a cause belongs to, in the order a check walks them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stage {
    /// Target policy (allowlist, always-denied addresses).
    Policy,
    /// Name resolution.
    Resolve,
    /// TCP connect.
    Tcp,
    /// X.224 Connection Request / Confirm.
    X224,
    /// TLS handshake on the same socket.
    Tls,
    /// Server certificate analysis.
    Cert,
    /// Credential pre-validation against the directory.
    Credential,
    /// NLA / CredSSP on the target.
    Nla,
    /// Network quality, judged from the round trips the other stages made.
    Network,
    /// The check as a whole (deadline).
    Check,
}

impl Stage {
    /// Every stage, in check order.
    pub const ALL: [Stage; 10] = [
        Stage::Policy,
        Stage::Resolve,
        Stage::Tcp,
        Stage::X224,
        Stage::Tls,
        Stage::Cert,
        Stage::Credential,
        Stage::Nla,
        Stage::Network,
        Stage::Check,
    ];

    /// Lower-case name used in logs, audit records and the CLI table.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Policy => "policy",
            Stage::Resolve => "resolve",
            Stage::Tcp => "tcp",
            Stage::X224 => "x224",
            Stage::Tls => "tls",
            Stage::Cert => "cert",
            Stage::Credential => "credential",
            Stage::Nla => "nla",
            Stage::Network => "network",
            Stage::Check => "check",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One row of the catalog.
#[derive(Debug)]
pub struct CauseInfo {
    /// The cause.
    pub cause: Cause,
    /// Public number (hundreds = stage).
    pub number: u16,
    /// Public name, as in the proto enum without the `CAUSE_` prefix.
    pub name: &'static str,
    /// Stage the cause is found at by default.
    pub stage: Stage,
    /// Default severity.
    pub severity: Severity,
    /// How it is detected.
    pub detection: &'static str,
    /// What mstsc would most likely have shown (`~` = inferred).
    pub client: &'static str,
    /// Closest FreeRDP `ERRCONNECT_*` name.
    pub freerdp: &'static str,
    /// Who fixes it.
    pub owner: Owner,
    /// What to do about it.
    pub remediation: &'static str,
}

macro_rules! catalog {
    ($( $num:literal $variant:ident $name:literal $stage:ident $sev:ident $owner:ident
        client $client:literal freerdp $freerdp:literal
        detect $detect:literal
        fix $fix:literal ; )*) => {
        /// A cause from the public catalog. `Ok` (1) means nothing to report.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        #[repr(u16)]
        pub enum Cause {
            /// Nothing to report.
            Ok = 1,
            $(
                #[doc = $detect]
                $variant = $num,
            )*
        }

        /// The catalog, in number order.
        pub static CATALOG: &[CauseInfo] = &[
            $(
                CauseInfo {
                    cause: Cause::$variant,
                    number: $num,
                    name: $name,
                    stage: Stage::$stage,
                    severity: Severity::$sev,
                    detection: $detect,
                    client: $client,
                    freerdp: $freerdp,
                    owner: Owner::$owner,
                    remediation: $fix,
                },
            )*
        ];
    };
}

catalog! {
    101 ResolveNameNotFound "RESOLVE_NAME_NOT_FOUND" Resolve Deny Net
        client "0x104 or 0x208" freerdp "DNS_NAME_NOT_FOUND"
        detect "NXDOMAIN / no A or AAAA records"
        fix "Fix the target's DNS record (A/AAAA) or the name stored in the vault; as a stopgap connect by IP address.";
    102 ResolveFailed "RESOLVE_FAILED" Resolve Deny Net
        client "0x508 / 0x604" freerdp "DNS_ERROR"
        detect "resolver timeout, SERVFAIL, refused"
        fix "Check the gateway host's resolvers (reachability, SERVFAIL, forwarders); as a stopgap connect by IP address.";
    201 TcpRefused "TCP_REFUSED" Tcp Deny Server
        client "0x204" freerdp "CONNECT_FAILED"
        detect "RST to SYN: nothing listens (Remote Desktop Services stopped, RDP disabled, wrong port)"
        fix "Start or restart Remote Desktop Services (TermService) on the target; check that RDP is enabled and listens on the expected port.";
    202 TcpTimeout "TCP_TIMEOUT" Tcp Deny Net
        client "0x204 / 0x108" freerdp "CONNECT_FAILED"
        detect "no SYN-ACK before the stage deadline: a firewall drops, or host down"
        fix "Allow TCP 3389 (or the configured port) through host and network firewalls and NAT; check that the host is up and the route or VPN works.";
    203 TcpUnreachable "TCP_UNREACHABLE" Tcp Deny Net
        client "0x204" freerdp "CONNECT_FAILED"
        detect "ICMP unreachable, no route, network down"
        fix "Fix routing to the target (route, VPN, ACL sending ICMP unreachable).";
    301 X224Closed "X224_CLOSED" X224 Deny Server
        client "0x904/0x7" freerdp "CONNECT_TRANSPORT_FAILED"
        detect "TCP accepted, then FIN/RST before a Connection Confirm arrives"
        fix "The RDP listener accepts and drops connections: restart TermService, look for a stuck session or a filter driver on the target, and check the System and TerminalServices event logs.";
    302 X224Timeout "X224_TIMEOUT" X224 Deny Server
        client "~0x704" freerdp "SECURITY_NEGO_CONNECT_FAILED"
        detect "no Connection Confirm before the stage deadline"
        fix "The target accepted TCP but never answered the RDP negotiation: restart TermService; check for an overloaded host or a middlebox holding the connection.";
    303 X224NotRdp "X224_NOT_RDP" X224 Deny Net
        client "~0x904" freerdp "CONNECT_TRANSPORT_FAILED"
        detect "reply is not a TPKT v3 / X.224 CC (another service on the port, a proxy page, garbage)"
        fix "Another service answers on this port (or a proxy intercepts it): check the port mapping, NAT and the service bound to the port.";
    304 NegSslRequired "NEG_SSL_REQUIRED" X224 Deny Gw
        client "~0x904/0x7" freerdp "SECURITY_NEGO_CONNECT_FAILED"
        detect "RDP_NEG_FAILURE 1"
        fix "The target requires TLS: offer SSL in the gateway's requested protocols.";
    305 NegSslNotAllowed "NEG_SSL_NOT_ALLOWED" X224 Deny Server
        client "~0x904/0x7" freerdp "SECURITY_NEGO_CONNECT_FAILED"
        detect "RDP_NEG_FAILURE 2: server allows only Standard RDP Security"
        fix "Set the target's Security Layer to Negotiate or SSL (Session Host > Security policy) so that it accepts TLS.";
    306 NegSslCertNotOnServer "NEG_SSL_CERT_NOT_ON_SERVER" X224 Deny Server
        client "~0x904/0x7" freerdp "TLS_CONNECT_FAILED"
        detect "RDP_NEG_FAILURE 3: server cannot use a certificate/private key (expired self-signed cert not renewed, unreadable key store such as a corrupt MachineKeys folder)"
        fix "On the target, check the Remote Desktop certificate store: move aside the corrupt MachineKeys folder (C:\\ProgramData\\Microsoft\\Crypto\\RSA\\MachineKeys) or fix its permissions, delete the expired Remote Desktop certificate and restart TermService so that Windows generates a fresh one (on Azure VMs via Run Command).";
    307 NegHybridRequired "NEG_HYBRID_REQUIRED" X224 Deny Gw
        client "0xB09" freerdp "HYBRID_REQUIRED_BY_SERVER"
        detect "RDP_NEG_FAILURE 5: server requires NLA and the request did not offer it"
        fix "The target requires Network Level Authentication: offer HYBRID (CredSSP) in the gateway's requested protocols, or relax the target's NLA policy.";
    308 NegFailureOther "NEG_FAILURE_OTHER" X224 Deny Server
        client "~0x904/0x7" freerdp "SECURITY_NEGO_CONNECT_FAILED"
        detect "RDP_NEG_FAILURE 4, 6 or an unknown code (keep the raw code)"
        fix "The target refused the security negotiation (see the raw failure code): align the target's Security Layer and NLA policy with the gateway's settings.";
    309 NegSecurityDowngrade "NEG_SECURITY_DOWNGRADE" X224 Deny Server
        client "~0x904/0x7" freerdp "SECURITY_NEGO_CONNECT_FAILED"
        detect "server selected a protocol that was not requested or is weaker than policy requires (e.g. Standard RDP Security when TLS or NLA was asked for)"
        fix "Align the target's Security Layer and NLA policy (Computer Config > Admin Templates > Windows Components > Remote Desktop Services > Session Host > Security) with the gateway's; a target that silently downgrades may also be an interception.";
    310 NegLegacyServer "NEG_LEGACY_SERVER" X224 Warn Server
        client "~0x904" freerdp "SECURITY_NEGO_CONNECT_FAILED"
        detect "Connection Confirm without RDP_NEG_RSP: a pre-2003 style server, Standard RDP Security only"
        fix "The target speaks only Standard RDP Security: upgrade it or enable TLS/NLA on it.";
    401 TlsClosedDuringHandshake "TLS_CLOSED_DURING_HANDSHAKE" Tls Deny Server
        client "0x904/0x7" freerdp "TLS_CONNECT_FAILED"
        detect "server closes or resets after the ClientHello with no TLS alert, or answers with a non-TLS record such as an X.224 Disconnect Request: typical when the server cannot use its private key (corrupt MachineKeys, key permissions)"
        fix "The target cannot use its certificate's private key: move aside the corrupt MachineKeys folder (C:\\ProgramData\\Microsoft\\Crypto\\RSA\\MachineKeys) or fix its permissions, delete the Remote Desktop certificate and restart TermService so that a fresh one is generated.";
    402 TlsVersionMismatch "TLS_VERSION_MISMATCH" Tls Deny Server
        client "~0x904/0x7" freerdp "TLS_CONNECT_FAILED"
        detect "protocol_version alert, or the server only speaks TLS 1.0/1.1 (report the version it offers)"
        fix "Enable TLS 1.2 on the target (Schannel protocols) and align the Security Layer policy.";
    403 TlsNoSharedCipher "TLS_NO_SHARED_CIPHER" Tls Deny Server
        client "~0x904/0x7" freerdp "TLS_CONNECT_FAILED"
        detect "handshake_failure / insufficient_security alert: no common cipher suite or group"
        fix "Enable modern TLS 1.2 cipher suites (ECDHE with AES-GCM) on the target (Schannel cipher suite order policy).";
    404 TlsHandshakeTimeout "TLS_HANDSHAKE_TIMEOUT" Tls Deny Net
        client "0x904 or 0x108" freerdp "TLS_CONNECT_FAILED"
        detect "TCP and X.224 fine, then the server's TLS flight never arrives before the deadline; when small packets flow but the certificate flight (> ~1400 bytes) does not, say so: path-MTU black hole suspected (VPN/MTU mismatch)"
        fix "Check the path for an MTU black hole (VPN/MTU mismatch, blocked ICMP fragmentation-needed): clamp TCP MSS on the VPN, fix the MTU, and check packet loss.";
    405 TlsAlert "TLS_ALERT" Tls Deny Server
        client "~0x904/0x7" freerdp "TLS_CONNECT_FAILED"
        detect "any other fatal alert (keep the alert number and name)"
        fix "The target aborted the TLS handshake with an alert (see evidence): check Schannel events (System log, source Schannel) on the target.";
    406 TlsProtocolError "TLS_PROTOCOL_ERROR" Tls Deny Server
        client "~0x904" freerdp "TLS_CONNECT_FAILED"
        detect "bytes after the confirm are not TLS at all"
        fix "The target answered the TLS handshake with something that is not TLS: check for a proxy or a broken RDP listener on the target.";
    501 CertExpired "CERT_EXPIRED" Cert Deny Server
        client "0x1B07 or 0x904/0x7" freerdp "TLS_CONNECT_FAILED"
        detect "notAfter in the past"
        fix "Renew the RDP certificate: delete it in Certificates (Local Computer) > Remote Desktop and restart TermService, or re-issue it from the enterprise CA.";
    502 CertNotYetValid "CERT_NOT_YET_VALID" Cert Deny Server
        client "0x1D07" freerdp "TLS_CONNECT_FAILED"
        detect "notBefore in the future (clock skew on either side)"
        fix "Check the clocks of the target and the gateway (NTP); re-issue the certificate if its notBefore is wrong.";
    503 CertExpiringSoon "CERT_EXPIRING_SOON" Cert Warn Server
        client "none yet" freerdp "none"
        detect "notAfter within the configured window (default 14 days)"
        fix "Renew the RDP certificate before it expires (delete it and restart TermService, or re-issue from the enterprise CA).";
    504 CertNameMismatch "CERT_NAME_MISMATCH" Cert Warn Server
        client "~0x907" freerdp "TLS_CONNECT_FAILED"
        detect "neither SAN nor CN matches the name the gateway dials (or the expected name given in the request)"
        fix "Issue the RDP certificate for the name the gateway dials (SAN DNS or IP entry), or store the target under the name its certificate carries.";
    505 CertUntrusted "CERT_UNTRUSTED" Cert Warn Server
        client "~0x907" freerdp "TLS_CONNECT_FAILED"
        detect "chain does not verify to the configured trust anchors; self-signed is normal for RDP, so warn by default"
        fix "Issue the RDP certificate from a CA the gateway trusts (enterprise CA template for Remote Desktop Authentication), or add its CA to the plugin's trust anchors.";
    506 CertPinMismatch "CERT_PIN_MISMATCH" Cert Deny Server
        client "0x907" freerdp "TLS_CONNECT_FAILED"
        detect "fingerprint differs from the pinned one or the one last seen for this target (possible interception or an unannounced re-issue)"
        fix "Confirm with the target's administrator whether the certificate was re-issued; if so, update the pin (remove the target from the pin store); if not, treat it as a possible interception.";
    507 CertWeak "CERT_WEAK" Cert Warn Server
        client "none" freerdp "none"
        detect "RSA key < 2048 bits, SHA-1/MD5 signature"
        fix "Re-issue the RDP certificate with an RSA key of at least 2048 bits (or ECDSA) and a SHA-256 signature.";
    508 CertWrongUsage "CERT_WRONG_USAGE" Cert Warn Server
        client "~0x907" freerdp "TLS_CONNECT_FAILED"
        detect "EKU present but has neither serverAuth nor Remote Desktop Authentication (1.3.6.1.4.1.311.54.1.2)"
        fix "Re-issue the RDP certificate with the Server Authentication or Remote Desktop Authentication extended key usage.";
    601 CredInvalid "CRED_INVALID" Credential Deny Vault
        client "~0x904/0x7" freerdp "LOGON_FAILURE"
        detect "49 with data 52e, or 49 with no ppolicy error: wrong password (the vault's copy is stale: \"Target Account password invalid\")"
        fix "The vault's copy of the target account's password is stale: reconcile or rotate it in the vault.";
    602 CredAccountNotFound "CRED_ACCOUNT_NOT_FOUND" Credential Deny Vault
        client "0xA07" freerdp "LOGON_FAILURE"
        detect "data 525 (many directories report 52e instead; never guess)"
        fix "The account does not exist in the directory: fix the account name (and domain) stored in the vault.";
    603 CredAccountDisabled "CRED_ACCOUNT_DISABLED" Credential Deny Dir
        client "0xB07" freerdp "ACCOUNT_DISABLED"
        detect "data 533"
        fix "Enable the account in the directory (or retire it from the vault).";
    604 CredAccountLocked "CRED_ACCOUNT_LOCKED" Credential Deny Dir
        client "0xD07" freerdp "ACCOUNT_LOCKED_OUT"
        detect "data 775, or ppolicy accountLocked"
        fix "Unlock the account in the directory, then find what locked it (a stale password elsewhere).";
    605 CredPasswordExpired "CRED_PASSWORD_EXPIRED" Credential Deny Vault
        client "0xF07" freerdp "PASSWORD_EXPIRED"
        detect "data 532*, or ppolicy passwordExpired"
        fix "The password has expired: rotate it through the vault.";
    606 CredPasswordMustChange "CRED_PASSWORD_MUST_CHANGE" Credential Deny Vault
        client "0x1207" freerdp "PASSWORD_MUST_CHANGE"
        detect "data 773*, or ppolicy changeAfterReset (that bind SUCCEEDS: still deny)"
        fix "The password was reset and must be changed at next logon: rotate it through the vault.";
    607 CredAccountExpired "CRED_ACCOUNT_EXPIRED" Credential Deny Dir
        client "0xE07" freerdp "ACCOUNT_EXPIRED"
        detect "data 701"
        fix "The account has expired: extend its expiry date in the directory.";
    608 CredLogonHours "CRED_LOGON_HOURS" Credential Deny Dir
        client "0x1007" freerdp "ACCOUNT_RESTRICTION"
        detect "data 530*"
        fix "The account may not log on at this time: adjust its logon hours in the directory.";
    609 CredWorkstationRestricted "CRED_WORKSTATION_RESTRICTED" Credential Deny Dir
        client "0x1107" freerdp "ACCOUNT_RESTRICTION"
        detect "data 531*"
        fix "The account may not log on from this workstation: adjust its allowed workstations (userWorkstations).";
    610 CredTokenTooLarge "CRED_TOKEN_TOO_LARGE" Credential Deny Dir
        client "~0x904" freerdp "AUTHENTICATION_FAILED"
        detect "data 568: too many group SIDs"
        fix "The account is in too many groups (token too large): reduce its group memberships.";
    611 CredLockoutGuard "CRED_LOCKOUT_GUARD" Credential Deny Vault
        client "~0x904/0x7" freerdp "LOGON_FAILURE"
        detect "the plugin did NOT bind because this account already failed recently; one more bad bind could lock it out"
        fix "This account failed recently and one more bad attempt could lock it out: reconcile the password in the vault, then retry after the guard window.";
    612 CredMissing "CRED_MISSING" Credential Deny Vault
        client "~0x904" freerdp "NO_OR_MISSING_CREDENTIALS"
        detect "no password, empty password (an empty-password bind is an anonymous bind and \"succeeds\" on some servers: never send it)"
        fix "The vault holds no password for this account: store one.";
    613 CredPasswordExpiring "CRED_PASSWORD_EXPIRING" Credential Warn Vault
        client "none" freerdp "none"
        detect "bind succeeded but the directory warns of expiry / grace logins"
        fix "The password is about to expire (or in grace logins): rotate it through the vault now.";
    651 DirectoryUnreachable "DIRECTORY_UNREACHABLE" Credential Deny Dir
        client "none" freerdp "KDC_UNREACHABLE"
        detect "every configured directory server refused, timed out or did not resolve"
        fix "No configured directory server answered: check the directory servers, their ports and the firewall between the plugin and them.";
    652 DirectoryTlsFailed "DIRECTORY_TLS_FAILED" Credential Deny Dir
        client "none" freerdp "none"
        detect "LDAPS / StartTLS handshake or certificate failure"
        fix "The directory's TLS failed: check its certificate (expiry, name) and the plugin's directory trust anchors.";
    653 DirectoryTimeout "DIRECTORY_TIMEOUT" Credential Deny Dir
        client "none" freerdp "none"
        detect "connected, but the bind got no answer before the deadline"
        fix "The directory accepted the connection but did not answer the bind in time: check the domain controller's load and health.";
    654 DirectoryConfidentialityRequired "DIRECTORY_CONFIDENTIALITY_REQUIRED" Credential Deny Gw
        client "none" freerdp "none"
        detect "resultCode 8 or 13: the server refuses simple binds without TLS (plugin misconfigured)"
        fix "The directory refuses simple binds without TLS: configure ldaps:// or StartTLS for the directory.";
    655 DirectoryError "DIRECTORY_ERROR" Credential Deny Dir
        client "none" freerdp "none"
        detect "any other resultCode (keep it and the diagnostic message)"
        fix "The directory answered an unexpected error (see result code and message): check the directory server.";
    656 DirectoryClockSkew "DIRECTORY_CLOCK_SKEW" Credential Warn Gw
        client "none" freerdp "none"
        detect "the KDC answers KRB_AP_ERR_SKEW (37): this host's clock and the domain's differ by more than the Kerberos tolerance (5 min); Kerberos logons from here fail and fall back to NTLM (a 37 to a pre-authenticated request means the password itself was right)"
        fix "This host's clock and the domain's differ by more than 5 minutes: fix the plugin host's time source (NTP) or the domain controllers' (w32time).";
    701 NlaCredsspOutdated "NLA_CREDSSP_OUTDATED" Nla Warn Server
        client "oracle dialog" freerdp "AUTHENTICATION_FAILED"
        detect "server TSRequest version < 5 (unpatched for CVE-2018-0886: \"CredSSP encryption oracle remediation\")"
        fix "Patch the target for CVE-2018-0886 (CredSSP); setting Encryption Oracle Remediation to Vulnerable is a diagnostic step only.";
    702 NlaLogonFailed "NLA_LOGON_FAILED" Nla Deny Vault
        client "~0x904/0x7" freerdp "LOGON_FAILURE"
        detect "logon refused: errorCode 0xC000006D / 0xC000006A / another NTSTATUS without a 6xx meaning (keep it), an NTLM or SPNEGO failure, or the server closing after the AUTHENTICATE message with no errorCode"
        fix "The target refused the logon: reconcile the account's password in the vault and check that the target trusts the account's domain.";
    703 NlaAccessDenied "NLA_ACCESS_DENIED" Nla Deny Server
        client "0x1307 / ext 0x9" freerdp "ACCESS_DENIED"
        detect "Early User Authorization Result 5, or logon type not granted"
        fix "The account may not log on to this target over RDP: add it to Remote Desktop Users or grant 'Allow log on through Remote Desktop Services'.";
    704 TargetIdentityMismatch "TARGET_IDENTITY_MISMATCH" Nla Deny Net
        client "none" freerdp "none"
        detect "the NTLM challenge names another computer than the one the request expects (compared with its NetBIOS and DNS computer names, case-insensitive)"
        fix "Another computer answers at this address: check DNS records, DHCP reservations, NAT and port forwards (or a possible interception).";
    705 ClockSkew "CLOCK_SKEW" Nla Warn Server
        client "0x1D07" freerdp "none"
        detect "the target's NTLM timestamp differs from ours by more than the Kerberos tolerance (5 min)"
        fix "Fix the target's (or the gateway's) clock: check its time source (w32time, NTP).";
    706 TargetSpnMissing "TARGET_SPN_MISSING" Nla Warn Dir
        client "~0x904/0x7 where NTLM is restricted" freerdp "AUTHENTICATION_FAILED"
        detect "the KDC has no TERMSRV/ principal for the name the gateway dials (TGS answer KDC_ERR_S_PRINCIPAL_UNKNOWN, 7): Kerberos to this target is impossible and clients fall back to NTLM; dialling an IP address or an alias always ends here"
        fix "Kerberos to this target is impossible under the name the gateway dials: have the gateway dial the DNS name registered in AD, or register TERMSRV/<name> on the computer account (setspn -S).";
    707 NlaNtlmRefused "NLA_NTLM_REFUSED" Nla Warn Server
        client "~0x207" freerdp "AUTHENTICATION_FAILED"
        detect "the target refuses NTLM itself (TSRequest errorCode STATUS_NTLM_BLOCKED 0xC0000418, SEC_E_UNSUPPORTED_FUNCTION 0x80090302, or STATUS_ACCOUNT_RESTRICTION 0xC000006E for a Protected Users account): it says nothing about the password; only Kerberos logons work there"
        fix "The target (or the account, e.g. Protected Users) refuses NTLM: only Kerberos logons work there; make sure the gateway dials the target's registered DNS name so Kerberos can be used.";
    801 NetHighLatency "NET_HIGH_LATENCY" Network Warn Net
        client "0x108 when extreme" freerdp "none"
        detect "handshake round trips above the configured threshold"
        fix "Round trips to the target are slow: check the route, VPN and link load.";
    802 NetUnstable "NET_UNSTABLE" Network Warn Net
        client "0x904 / 0x304 / 0x404" freerdp "CONNECT_TRANSPORT_FAILED"
        detect "repeated probes in one check disagree, or a stage needed retransmission-scale delays (packet loss, flapping VPN)"
        fix "The path to the target is unstable (loss, flapping VPN): check VPN throughput, packet loss and MTU/MSS clamping on the path.";
    901 PolicyTargetDenied "POLICY_TARGET_DENIED" Policy Deny Gw
        client "none" freerdp "none"
        detect "target address or name outside the configured allowlist (or in the always-denied set: loopback, link-local, cloud metadata)"
        fix "The target is outside the plugin's target policy: add its network, DNS suffix or port to the allowlist if it is legitimate.";
    902 CheckDeadlineExceeded "CHECK_DEADLINE_EXCEEDED" Check Deny Gw
        client "none" freerdp "none"
        detect "the whole check ran out of time; stages not reached are reported as not run"
        fix "The check ran out of time: raise the gateway's deadline or the plugin's check budget, and look at the slowest stage.";
}

impl Cause {
    /// This cause's row in the catalog (`None` for `Ok`).
    pub fn info(self) -> Option<&'static CauseInfo> {
        CATALOG.iter().find(|c| c.cause == self)
    }

    /// Public number.
    pub fn number(self) -> u16 {
        self as u16
    }

    /// Public name (`OK` for `Ok`).
    pub fn name(self) -> &'static str {
        self.info().map_or("OK", |i| i.name)
    }

    /// Looks a cause up by public number.
    pub fn from_number(n: u16) -> Option<Cause> {
        if n == 1 {
            return Some(Cause::Ok);
        }
        CATALOG.iter().find(|c| c.number == n).map(|c| c.cause)
    }

    /// Looks a cause up by public name, with or without the `CAUSE_` prefix, any case.
    pub fn from_name(name: &str) -> Option<Cause> {
        let n = name.trim();
        let n = n
            .strip_prefix("CAUSE_")
            .or_else(|| n.strip_prefix("cause_"))
            .unwrap_or(n);
        if n.eq_ignore_ascii_case("OK") {
            return Some(Cause::Ok);
        }
        CATALOG.iter().find(|c| c.name.eq_ignore_ascii_case(n)).map(|c| c.cause)
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The client error a cause predicts, parsed from the catalog's notation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientError {
    /// Disconnect reason (e.g. 0x904).
    pub disconnect_reason: u32,
    /// Extended disconnect reason (e.g. 0x7), 0 when none.
    pub extended_reason: u32,
    /// The catalog's notation.
    pub code: &'static str,
    /// Readable text.
    pub text: String,
    /// Closest FreeRDP `ERRCONNECT_*` name.
    pub freerdp: &'static str,
    /// The mapping is an inference (`~`).
    pub inferred: bool,
}

impl CauseInfo {
    /// The client error this cause predicts, when the catalog names one.
    pub fn client_error(&self) -> ClientError {
        let code = self.client;
        let inferred = code.starts_with('~');
        let first = code.trim_start_matches('~').split([' ', ',']).next().unwrap_or("");
        let mut parts = first.split('/');
        let parse = |s: Option<&str>| {
            s.and_then(|s| u32::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok())
                .unwrap_or(0)
        };
        let disconnect_reason = parse(parts.next());
        let extended_reason = parse(parts.next());
        ClientError {
            disconnect_reason,
            extended_reason,
            code,
            text: client_text(disconnect_reason, extended_reason),
            freerdp: self.freerdp,
            inferred,
        }
    }
}

/// Readable text for a mstsc disconnect reason / extended reason pair.
fn client_text(reason: u32, ext: u32) -> String {
    let base = match reason {
        0 => return "no client error expected".to_owned(),
        0x104 | 0x208 => "The computer could not be found (DNS lookup failed)",
        0x508 | 0x604 => "Name resolution failed",
        0x204 | 0x108 => "The remote computer cannot be reached (connection failed or timed out)",
        0x704 => "Connection timed out during security negotiation",
        0x904 => "Socket closed by the remote computer",
        0x907 => "The certificate of the remote computer is not valid or not trusted",
        0xB09 => "The remote computer requires Network Level Authentication",
        0x304 | 0x404 => "Network connection lost",
        0xA07 => "The user account does not exist",
        0xB07 => "The user account is disabled",
        0xD07 => "The user account is locked out",
        0xE07 => "The user account has expired",
        0xF07 => "The password has expired",
        0x1007 => "Account logon time restriction",
        0x1107 => "Account workstation restriction",
        0x1207 => "The password must be changed before logging on",
        0x1307 => "Access denied: the account may not log on remotely",
        0x1B07 => "The server's certificate has expired",
        0x1D07 => "Time and date differ between the client and the remote computer",
        _ => "Unrecognised disconnect reason",
    };
    if ext == 0x7 {
        format!("{base} (extended: server denied the connection)")
    } else if ext != 0 {
        format!("{base} (extended reason 0x{ext:x})")
    } else {
        base.to_owned()
    }
}

/// The proto enum body the catalog implies (between the `@@CAUSES-BEGIN@@` markers).
pub fn proto_enum_lines() -> String {
    let mut s = String::new();
    for c in CATALOG {
        s.push_str(&format!("  CAUSE_{} = {};\n", c.name, c.number));
    }
    s
}

/// `docs/causes.md` as generated from the catalog.
pub fn docs_markdown() -> String {
    let mut s = String::from(
        "# Cause catalog\n\n\
         Generated from `plugin/src/cause.rs` (do not edit by hand: \
         `UPDATE_GENERATED=1 cargo test -p rdp-preflight catalog` regenerates it).\n\n\
         Every finding carries one cause. Numbers and names are a public contract: append only.\n\
         Proto enum `preflight.v1.Cause`: `CAUSE_<NAME> = <number>`; JSON uses the enum name.\n\
         `sev` is the default severity (operators override it per cause in config); `client` is \
         what mstsc would most likely have shown (`~` = inferred); `owner` is who fixes it.\n\n\
         | # | name | sev | owner | client | FreeRDP | detection | remediation |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for c in CATALOG {
        let sev = match c.severity {
            Severity::Deny => "deny",
            Severity::Warn => "warn",
        };
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            c.number,
            c.name,
            sev,
            c.owner.as_str(),
            c.client,
            c.freerdp,
            c.detection.replace('|', "\\|"),
            c.remediation.replace('|', "\\|"),
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_unique_sorted_and_in_their_stage_hundred() {
        let mut last = 1;
        for c in CATALOG {
            assert!(c.number > last, "{} out of order", c.name);
            last = c.number;
            assert_eq!(c.cause as u16, c.number);
            assert_eq!(Cause::from_number(c.number), Some(c.cause));
            assert_eq!(Cause::from_name(c.name), Some(c.cause));
            assert_eq!(Cause::from_name(&format!("CAUSE_{}", c.name)), Some(c.cause));
        }
        assert_eq!(CATALOG.len(), 59);
    }

    #[test]
    fn client_error_parses_catalog_notation() {
        let e = Cause::X224Closed.info().map(CauseInfo::client_error);
        let e = e.expect("catalog row");
        assert_eq!((e.disconnect_reason, e.extended_reason, e.inferred), (0x904, 7, false));
        let e = Cause::NegSslRequired.info().map(CauseInfo::client_error).expect("row");
        assert_eq!((e.disconnect_reason, e.extended_reason, e.inferred), (0x904, 7, true));
        let e = Cause::CertExpired.info().map(CauseInfo::client_error).expect("row");
        assert_eq!((e.disconnect_reason, e.extended_reason), (0x1B07, 0));
        let e = Cause::DirectoryError.info().map(CauseInfo::client_error).expect("row");
        assert_eq!(e.disconnect_reason, 0);
    }
}
