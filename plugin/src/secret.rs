//! Secrets have a type: no `Debug` output, no `Serialize`, zeroized on drop.

use std::fmt;

use zeroize::Zeroizing;

/// A password. Its `Debug` and `Display` print `[redacted]`; the bytes are wiped on drop.
#[derive(Clone)]
pub struct Password(Zeroizing<String>);

impl Password {
    /// Takes ownership of the string.
    pub fn new(s: String) -> Self {
        Password(Zeroizing::new(s))
    }

    /// The secret itself: call only where it goes on the wire or into a keyed hash.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// True for an empty password (never sent: an empty simple bind is anonymous).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// The target account's credential as a check carries it.
#[derive(Clone, Debug)]
pub struct Credential {
    /// sAMAccountName, UPN or the `{user}` of a DN template.
    pub username: String,
    /// Domain for UPN / down-level identities (may be empty).
    pub domain: String,
    /// The password.
    pub password: Password,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_the_password() {
        let c = Credential {
            username: "alice".into(),
            domain: "EXAMPLE".into(),
            password: Password::new("canary-Pa55w0rd!".into()),
        };
        let dbg = format!("{c:?} {} {:?}", c.password, c.password);
        assert!(!dbg.contains("canary"), "{dbg}");
        assert!(dbg.contains("[redacted]"));
        assert_eq!(c.password.expose(), "canary-Pa55w0rd!");
    }
}
