//! The `[directory]` config table and its validation.

use std::{path::PathBuf, sync::Arc, time::Duration};

use rustls_pki_types::{pem::PemObject, CertificateDer};

use crate::secret::Password;

/// The `[directory]` table: where and how the target account's credential is pre-validated by
/// an LDAP simple bind. Without `servers` the credential stage is skipped.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DirectoryFile {
    /// Directory servers as `ldaps://host:port` or `ldap://host:port`, tried in order. The next
    /// one is tried only when a server cannot be reached or its TLS handshake fails, never
    /// after a bind answer. Default: none (credential stage skipped).
    pub servers: Vec<String>,
    /// Use StartTLS on `ldap://` servers. Default: true.
    pub starttls: bool,
    /// Allow `ldap://` without StartTLS, i.e. the password in clear on the wire. Only for tests
    /// of a directory's "confidentiality required" answer. Default: false.
    pub allow_plaintext: bool,
    /// PEM file with the trust anchors for the directory's certificate (the enterprise CA).
    /// Required as soon as a server uses TLS: the system's roots are deliberately not used.
    /// Default: none.
    pub ca_file: Option<PathBuf>,
    /// Limit for TCP connect, and separately for the TLS / StartTLS handshake, per server.
    /// Default: 3000.
    pub connect_timeout_ms: u64,
    /// Limit for each LDAP operation (bind, search) after connecting. Default: 5000.
    pub bind_timeout_ms: u64,
    /// The bind identity: `upn` (`{user}@{domain}`, or the username as is when it already
    /// contains `@`), `downlevel` (`{domain}\{user}`), `dn:TEMPLATE` with `{user}` and
    /// `{domain}` placeholders, RFC 4514-escaped (e.g. `dn:uid={user},ou=people,dc=example,dc=test`),
    /// or `search` (bind as `service_dn`, find the entry with `search_filter` under
    /// `search_base`, bind as its DN). Default: `upn`.
    pub bind_as: String,
    /// Service account DN for `bind_as = "search"` and `read_lockout_state`. Default: none.
    pub service_dn: Option<String>,
    /// File holding the service account's password (trailing newline ignored). Default: none.
    pub service_password_file: Option<PathBuf>,
    /// Environment variable holding the service account's password. Default: none.
    pub service_password_env: Option<String>,
    /// Base DN for the search. Default: none (required by `search` and `read_lockout_state`).
    pub search_base: Option<String>,
    /// Filter for the search, `{user}` and `{domain}` RFC 4515-escaped.
    /// Default: `(|(sAMAccountName={user})(uid={user}))`.
    pub search_filter: String,
    /// How long the lockout guard remembers a failed attempt. Default: 900.
    pub guard_window_secs: u64,
    /// After a first failure with one password, how many further different passwords may be
    /// tried for the account within the window before the guard answers CRED_LOCKOUT_GUARD
    /// without binding. The same failing password is never retried within the window (the
    /// remembered cause is reported). Default: 1.
    pub guard_max_distinct_failures: u32,
    /// Remember successful binds (HMAC of account and password, in memory only) for this many
    /// seconds, so that a login storm does not hammer the directory. Trade-off: within the TTL
    /// a password changed or an account disabled in the directory is not noticed. Default: 0
    /// (off).
    pub success_cache_ttl_secs: u64,
    /// Idle authenticated connections kept per process and reused by rebinding; 0 disables
    /// pooling. Default: 4.
    pub pool_size: usize,
    /// With a service account: before binding, read the account's failure count (AD
    /// `badPwdCount`, OpenLDAP ppolicy `pwdFailureTime` values) and the lockout threshold
    /// (AD domain `lockoutThreshold`, ppolicy `pwdMaxFailure`), and refuse (CRED_LOCKOUT_GUARD)
    /// a bind that could be the one that locks the account. Default: false.
    pub read_lockout_state: bool,
    /// OpenLDAP: DN of the default password policy (the server's `ppolicy_default`), used by
    /// `read_lockout_state` when the entry has no `pwdPolicySubentry`. Default: none.
    pub default_policy_dn: Option<String>,
    /// The domains' two names, NetBIOS = DNS (e.g. `{ EXAMPLE = "example.test" }`), so that
    /// `EXAMPLE\user`, `user@example.test` and `user` + `EXAMPLE` are one account for the
    /// lockout guard, and a request whose domain contradicts its UPN is refused. Used by the
    /// NLA stage too, with or without `servers`. Default: none.
    pub domains: std::collections::BTreeMap<String, String>,
}

impl Default for DirectoryFile {
    fn default() -> Self {
        DirectoryFile {
            servers: Vec::new(),
            starttls: true,
            allow_plaintext: false,
            ca_file: None,
            connect_timeout_ms: 3000,
            bind_timeout_ms: 5000,
            bind_as: "upn".into(),
            service_dn: None,
            service_password_file: None,
            service_password_env: None,
            search_base: None,
            search_filter: "(|(sAMAccountName={user})(uid={user}))".into(),
            guard_window_secs: 900,
            guard_max_distinct_failures: 1,
            success_cache_ttl_secs: 0,
            pool_size: 4,
            read_lockout_state: false,
            default_policy_dn: None,
            domains: std::collections::BTreeMap::new(),
        }
    }
}

/// How the bind identity is formed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BindAs {
    /// `{user}@{domain}`.
    Upn,
    /// `{domain}\{user}`.
    Downlevel,
    /// A DN template.
    Dn(String),
    /// Search-then-bind with the service account.
    Search,
}

/// One validated server URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerUrl {
    /// `ldaps` or `ldap`.
    pub tls: bool,
    /// Host name or address (no brackets).
    pub host: String,
    /// Port (default 636 / 389).
    pub port: u16,
}

impl ServerUrl {
    /// The URL as ldap3 takes it.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "ldaps" } else { "ldap" };
        if self.host.contains(':') {
            format!("{scheme}://[{}]:{}", self.host, self.port)
        } else {
            format!("{scheme}://{}:{}", self.host, self.port)
        }
    }

    fn parse(s: &str) -> Result<ServerUrl, String> {
        let (scheme, rest) = s.split_once("://").ok_or_else(|| format!("not a URL: {s:?}"))?;
        let tls = match scheme.to_ascii_lowercase().as_str() {
            "ldaps" => true,
            "ldap" => false,
            other => return Err(format!("unsupported scheme {other:?} (ldaps:// or ldap://)")),
        };
        let hostport = rest.strip_suffix('/').unwrap_or(rest);
        if hostport.contains(['/', '?', '@', '#']) {
            return Err(format!("only scheme://host[:port] is accepted: {s:?}"));
        }
        let (host, port) = if let Some(r) = hostport.strip_prefix('[') {
            let (h, p) = r.split_once(']').ok_or_else(|| format!("unclosed '[' in {s:?}"))?;
            (h.to_string(), p.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (hostport.to_string(), None),
            }
        };
        if host.is_empty() {
            return Err(format!("no host in {s:?}"));
        }
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("bad port in {s:?}"))?,
            None if tls => 636,
            None => 389,
        };
        Ok(ServerUrl { tls, host, port })
    }
}

/// A service account (search-then-bind, lockout state).
#[derive(Clone, Debug)]
pub struct ServiceAccount {
    /// Its DN.
    pub dn: String,
    /// Its password.
    pub password: Password,
}

/// The validated `[directory]` table.
#[derive(Clone, Debug)]
pub struct DirectoryConfig {
    /// Servers in failover order.
    pub servers: Vec<ServerUrl>,
    /// TLS client config (trust anchors from `ca_file`), when any server uses TLS.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// StartTLS on `ldap://`.
    pub starttls: bool,
    /// Connect / handshake limit.
    pub connect_timeout: Duration,
    /// Operation limit.
    pub bind_timeout: Duration,
    /// Bind identity.
    pub bind_as: BindAs,
    /// Service account, if configured.
    pub service: Option<ServiceAccount>,
    /// Search base.
    pub search_base: Option<String>,
    /// Search filter template.
    pub search_filter: String,
    /// Guard window.
    pub guard_window: Duration,
    /// Guard: further distinct passwords.
    pub guard_max_distinct_failures: u32,
    /// Success cache TTL (zero = off).
    pub success_cache_ttl: Duration,
    /// Idle pool size.
    pub pool_size: usize,
    /// Read lockout state first.
    pub read_lockout_state: bool,
    /// Default ppolicy DN.
    pub default_policy_dn: Option<String>,
}

impl DirectoryFile {
    /// Applies the CLI overrides (`--directory URL` repeatable, `--directory-ca PEM`,
    /// `--bind-as ...`); empty / `None` leaves the config's value.
    pub fn override_with(&mut self, servers: &[String], ca_file: Option<PathBuf>, bind_as: Option<String>) {
        if !servers.is_empty() {
            self.servers = servers.to_vec();
        }
        if ca_file.is_some() {
            self.ca_file = ca_file;
        }
        if let Some(b) = bind_as {
            self.bind_as = b;
        }
    }

    /// Checks the table; `Ok(None)` when no server is configured. Reads `ca_file` and the
    /// service password now, so that a bad file fails at startup.
    /// The validated `directory.domains`.
    pub fn domains(&self) -> Result<crate::guard::identity::Domains, String> {
        crate::guard::identity::Domains::new(self.domains.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .map_err(|e| format!("directory.domains: {e}"))
    }

    pub fn validate(&self) -> Result<Option<DirectoryConfig>, String> {
        if self.servers.is_empty() {
            return Ok(None);
        }
        let mut servers = Vec::new();
        for (i, s) in self.servers.iter().enumerate() {
            let u = ServerUrl::parse(s.trim()).map_err(|e| format!("directory.servers[{i}]: {e}"))?;
            if !u.tls && !self.starttls && !self.allow_plaintext {
                return Err(format!(
                    "directory.servers[{i}]: {s} without StartTLS would send passwords in clear; \
                     use ldaps://, or keep directory.starttls = true"
                ));
            }
            servers.push(u);
        }
        let needs_tls = servers.iter().any(|u| u.tls || self.starttls);
        let tls = match (&self.ca_file, needs_tls) {
            (Some(path), _) => Some(load_tls(path)?),
            (None, true) => {
                return Err("directory.ca_file: required for ldaps:// and StartTLS (the system's \
                            trust anchors are not used for the directory)"
                    .into())
            }
            (None, false) => None,
        };
        if self.connect_timeout_ms == 0 {
            return Err("directory.connect_timeout_ms: must be > 0".into());
        }
        if self.bind_timeout_ms == 0 {
            return Err("directory.bind_timeout_ms: must be > 0".into());
        }
        let bind_as = match self.bind_as.trim() {
            "upn" => BindAs::Upn,
            "downlevel" => BindAs::Downlevel,
            "search" => BindAs::Search,
            t if t.starts_with("dn:") => {
                let tpl = t["dn:".len()..].trim().to_string();
                if !tpl.contains("{user}") {
                    return Err(format!(
                        "directory.bind_as: the DN template must contain {{user}}: {tpl:?}"
                    ));
                }
                BindAs::Dn(tpl)
            }
            other => {
                return Err(format!(
                    "directory.bind_as: expected \"upn\", \"downlevel\", \"dn:TEMPLATE\" or \"search\", got {other:?}"
                ))
            }
        };
        let service = self.service_account()?;
        let uses_service = bind_as == BindAs::Search || self.read_lockout_state;
        if uses_service {
            let why = if bind_as == BindAs::Search {
                "bind_as = \"search\""
            } else {
                "read_lockout_state"
            };
            if service.is_none() {
                return Err(format!(
                    "directory.service_dn: {why} needs a service account (service_dn with \
                     service_password_file or service_password_env)"
                ));
            }
            if self.search_base.as_deref().is_none_or(|b| b.trim().is_empty()) {
                return Err(format!("directory.search_base: required by {why}"));
            }
            if !self.search_filter.contains("{user}") {
                return Err(format!(
                    "directory.search_filter: must contain {{user}}: {:?}",
                    self.search_filter
                ));
            }
        }
        Ok(Some(DirectoryConfig {
            servers,
            tls,
            starttls: self.starttls,
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            bind_timeout: Duration::from_millis(self.bind_timeout_ms),
            bind_as,
            service,
            search_base: self.search_base.clone(),
            search_filter: self.search_filter.clone(),
            guard_window: Duration::from_secs(self.guard_window_secs),
            guard_max_distinct_failures: self.guard_max_distinct_failures,
            success_cache_ttl: Duration::from_secs(self.success_cache_ttl_secs),
            pool_size: self.pool_size,
            read_lockout_state: self.read_lockout_state,
            default_policy_dn: self.default_policy_dn.clone(),
        }))
    }

    fn service_account(&self) -> Result<Option<ServiceAccount>, String> {
        let password = match (&self.service_password_file, &self.service_password_env) {
            (Some(_), Some(_)) => {
                return Err("directory.service_password_file: set either it or service_password_env, not both".into())
            }
            (Some(path), None) => {
                let s = std::fs::read_to_string(path)
                    .map_err(|e| format!("directory.service_password_file: cannot read {}: {e}", path.display()))?;
                Some(Password::new(s.trim_end_matches(['\r', '\n']).to_string()))
            }
            (None, Some(var)) => {
                let s = std::env::var(var)
                    .map_err(|_| format!("directory.service_password_env: variable {var} is not set"))?;
                Some(Password::new(s))
            }
            (None, None) => None,
        };
        match (&self.service_dn, password) {
            (Some(dn), Some(pw)) => {
                if pw.is_empty() {
                    return Err("directory.service_password_file: the service password is empty".into());
                }
                Ok(Some(ServiceAccount {
                    dn: dn.clone(),
                    password: pw,
                }))
            }
            (Some(_), None) => Err("directory.service_dn: needs service_password_file or service_password_env".into()),
            (None, Some(_)) => Err("directory.service_dn: a service password is set but no service_dn".into()),
            (None, None) => Ok(None),
        }
    }
}

fn load_tls(path: &std::path::Path) -> Result<Arc<rustls::ClientConfig>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("directory.ca_file: cannot read {}: {e}", path.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| format!("directory.ca_file: {}: {e}", path.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("directory.ca_file: {}: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("directory.ca_file: no certificate in {}", path.display()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("directory.ca_file: TLS setup: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_no_servers() {
        let f: DirectoryFile = toml::from_str("").expect("empty table");
        assert_eq!(f, DirectoryFile::default());
        assert!(f.validate().expect("valid").is_none());
        assert!(f.starttls && !f.allow_plaintext && f.pool_size == 4 && f.guard_max_distinct_failures == 1);
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = toml::from_str::<DirectoryFile>("serverz = []").expect_err("unknown key");
        assert!(e.to_string().contains("serverz"), "{e}");
    }

    #[test]
    fn errors_name_the_key() {
        let f = DirectoryFile {
            servers: vec!["ldaps://a:636".into(), "http://b".into()],
            ..Default::default()
        };
        let e = f.validate().expect_err("bad scheme");
        assert!(
            e.starts_with("directory.servers[1]: unsupported scheme \"http\""),
            "{e}"
        );
        let f = DirectoryFile {
            servers: vec!["ldaps://a".into()],
            ..Default::default()
        };
        assert!(f.validate().expect_err("no ca").starts_with("directory.ca_file"));
        let f = DirectoryFile {
            servers: vec!["ldap://a".into()],
            starttls: false,
            ..Default::default()
        };
        assert!(f.validate().expect_err("plain").starts_with("directory.servers[0]"));
        let f = DirectoryFile {
            servers: vec!["ldap://a".into()],
            starttls: false,
            allow_plaintext: true,
            bind_as: "kerberos".into(),
            ..Default::default()
        };
        assert!(f.validate().expect_err("bind_as").starts_with("directory.bind_as"));
        let f = DirectoryFile {
            servers: vec!["ldap://a".into()],
            starttls: false,
            allow_plaintext: true,
            bind_as: "search".into(),
            ..Default::default()
        };
        assert!(f.validate().expect_err("service").starts_with("directory.service_dn"));
    }

    #[test]
    fn urls() {
        let u = ServerUrl::parse("ldaps://dc1.example.test").expect("url");
        assert_eq!((u.tls, u.host.as_str(), u.port), (true, "dc1.example.test", 636));
        let u = ServerUrl::parse("LDAP://127.0.0.1:3389/").expect("url");
        assert_eq!((u.tls, u.port), (false, 3389));
        let u = ServerUrl::parse("ldap://[::1]:10389").expect("url");
        assert_eq!((u.host.as_str(), u.url()), ("::1", "ldap://[::1]:10389".to_string()));
        assert!(ServerUrl::parse("ldaps://h:0").is_err());
        assert!(ServerUrl::parse("ldaps://h:99999").is_err());
        assert!(ServerUrl::parse("ldaps://h/dc=x").is_err());
        assert!(ServerUrl::parse("ldaps://").is_err());
    }

    #[test]
    fn plaintext_with_template() {
        let f = DirectoryFile {
            servers: vec!["ldap://127.0.0.1:389".into()],
            starttls: false,
            allow_plaintext: true,
            bind_as: "dn:uid={user},ou=people,dc=example,dc=test".into(),
            ..Default::default()
        };
        let c = f.validate().expect("valid").expect("some");
        assert_eq!(c.bind_as, BindAs::Dn("uid={user},ou=people,dc=example,dc=test".into()));
        assert!(c.tls.is_none());
    }
}
