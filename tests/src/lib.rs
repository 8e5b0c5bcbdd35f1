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
