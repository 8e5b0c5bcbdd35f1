//! Shared helpers for the integration tests.

pub mod bench;
pub mod plugin;
pub mod postgres;
pub mod rsyslog;
pub mod samba;
pub mod shadow;
pub mod slapd;

use std::time::Duration;

use rdp_preflight::{
    deadline::Budget,
    secret::{Credential, Password},
};

/// A credential for a test.
pub fn cred(user: &str, domain: &str, pw: &str) -> Credential {
    Credential {
        username: user.into(),
        domain: domain.into(),
        password: Password::new(pw.into()),
    }
}

/// A generous budget for one check.
pub fn budget() -> Budget {
    Budget::new(Duration::from_secs(10))
}

/// The simulated directory with one good account, its CA written to `dir/dir-ca.pem`: the
/// directory and the CA's path.
pub async fn one_account_directory(
    name: &str,
    password: &str,
    dir: &std::path::Path,
) -> (gateway_sim::directory::Directory, std::path::PathBuf) {
    let d = gateway_sim::directory::start_directory(
        &[gateway_sim::scenario::Account {
            name: name.into(),
            password: password.into(),
            state: "good".into(),
            domain: None,
        }],
        gateway_sim::directory::DirectoryOptions::default(),
    )
    .await
    .expect("directory");
    let ca = dir.join("dir-ca.pem");
    std::fs::write(&ca, d.ca_pem()).expect("ca");
    (d, ca)
}
