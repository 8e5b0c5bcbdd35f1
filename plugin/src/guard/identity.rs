//! The identity an attempt spends: one canonical string per account, whatever the spelling.
//!
//! - `user` + `EXAMPLE`, `user@example.test`, `EXAMPLE\user` and any case of them are one
//!   account when the domain's two names are known (`directory.domains = { EXAMPLE =
//!   "example.test" }`): `user@example.test`.
//! - A DN (found by `search`, or filled from a template) is the account itself:
//!   `dn:` + the DN lower-cased, with the spaces around `,` and `=` removed.
//! - NLA without a directory: the (user, domain) pair after splitting, where `.` and an empty
//!   domain mean the target's own (the domain its NTLM challenge names).

use std::collections::HashMap;

/// The domain's NetBIOS and DNS names, from config (`directory.domains`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Domains {
    /// NetBIOS name (lower case) → DNS name (lower case).
    netbios_to_dns: HashMap<String, String>,
}

/// A request whose domain contradicts its user name.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("domain {domain:?} contradicts the user name's domain {named:?}")]
pub struct Contradiction {
    /// The request's `domain`.
    pub domain: String,
    /// The domain inside the user name.
    pub named: String,
}

fn clean(d: &str) -> String {
    d.trim().trim_end_matches('.').to_lowercase()
}

impl Domains {
    /// From `NETBIOS = "dns.name"` pairs; an error names the pair that is not valid.
    pub fn new<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Domains, String> {
        let mut netbios_to_dns = HashMap::new();
        for (nb, dns) in pairs {
            let (nb, dns) = (clean(nb), clean(dns));
            if nb.is_empty() || nb.contains('.') || nb.len() > 15 {
                return Err(format!(
                    "{nb:?} is not a NetBIOS domain name (one label, 15 characters at most)"
                ));
            }
            if dns.is_empty() || !dns.contains('.') {
                return Err(format!("{dns:?} is not a DNS domain name"));
            }
            netbios_to_dns.insert(nb, dns);
        }
        Ok(Domains { netbios_to_dns })
    }

    /// The canonical (DNS, lower-case) form of a domain name: a known NetBIOS name is mapped.
    pub fn canonical(&self, domain: &str) -> String {
        let d = clean(domain);
        self.netbios_to_dns.get(&d).cloned().unwrap_or(d)
    }

    /// Splits a user name as a Windows client would (`DOMAIN\user`, `user@domain`, `user`)
    /// and checks it against the request's `domain`. Returns (user, domain as written).
    pub fn split<'a>(&self, user: &'a str, domain: &'a str) -> Result<(&'a str, &'a str), Contradiction> {
        let user = user.trim();
        let domain = domain.trim();
        let (u, named) = if let Some((d, u)) = user.split_once('\\') {
            (u, Some(d))
        } else if let Some((u, d)) = user.rsplit_once('@') {
            (u, Some(d))
        } else {
            (user, None)
        };
        match named {
            None => Ok((u, domain)),
            Some(n) if domain.is_empty() || domain == "." || self.same(domain, n) => Ok((u, n)),
            Some(n) => Err(Contradiction {
                domain: domain.to_owned(),
                named: n.to_owned(),
            }),
        }
    }

    /// Whether two domain names name the same domain as far as config tells.
    fn same(&self, a: &str, b: &str) -> bool {
        let (ca, cb) = (self.canonical(a), self.canonical(b));
        if ca == cb {
            return true;
        }
        // A NetBIOS name that config does not map may still be the DNS name's: say so only
        // when nothing contradicts it (one side a single label, unknown to config).
        // A DNS name config knows has a known NetBIOS name, and it is not this one.
        let unknown_label = |x: &str, cx: &str| !x.contains('.') && !self.netbios_to_dns.contains_key(cx);
        let unknown_dns = |cx: &str| cx.contains('.') && !self.netbios_to_dns.values().any(|v| v == cx);
        (unknown_label(a, &ca) && unknown_dns(&cb)) || (unknown_label(b, &cb) && unknown_dns(&ca))
    }

    /// The canonical account for a (user, domain) pair: `user@dnsdomain`, lower case. An empty
    /// or `.` domain is replaced by `own_domain` (the target's, for NLA).
    pub fn account(&self, user: &str, domain: &str, own_domain: &str) -> Result<String, Contradiction> {
        let (u, d) = self.split(user, domain)?;
        let d = if d.is_empty() || d == "." { own_domain } else { d };
        Ok(format!("{}@{}", u.trim().to_lowercase(), self.canonical(d)))
    }
}

/// The canonical form of a DN: `dn:` + lower case, no spaces around `,` `=` `+`.
pub fn dn(dn: &str) -> String {
    let mut out = String::with_capacity(dn.len() + 3);
    out.push_str("dn:");
    let mut escaped = false;
    let mut pending_space = false;
    for c in dn.trim().chars() {
        if escaped {
            out.extend(c.to_lowercase());
            escaped = false;
            continue;
        }
        match c {
            '\\' => {
                if pending_space {
                    out.push(' ');
                    pending_space = false;
                }
                out.push(c);
                escaped = true;
            }
            ' ' => pending_space = true,
            ',' | '=' | '+' => {
                // Spaces before a separator are dropped, and so are those after it.
                while out.ends_with(' ') {
                    out.pop();
                }
                pending_space = false;
                out.push(c);
            }
            _ => {
                if pending_space && !matches!(out.chars().last(), Some(',' | '=' | '+')) {
                    out.push(' ');
                }
                pending_space = false;
                out.extend(c.to_lowercase());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> Domains {
        Domains::new([("EXAMPLE", "example.test")]).expect("valid")
    }

    #[test]
    fn every_spelling_is_one_account() {
        let d = example();
        let want = "alice@example.test";
        for (u, dom) in [
            ("alice", "EXAMPLE"),
            ("Alice", "example"),
            ("alice", "example.test"),
            ("ALICE", "Example.Test."),
            ("alice@example.test", ""),
            ("alice@EXAMPLE.TEST", "EXAMPLE"),
            ("EXAMPLE\\alice", ""),
            ("example\\ALICE", "example.test"),
            (" alice ", " EXAMPLE "),
        ] {
            assert_eq!(d.account(u, dom, "").as_deref(), Ok(want), "{u} / {dom}");
        }
    }

    #[test]
    fn own_domain_for_dot_and_empty() {
        let d = example();
        assert_eq!(d.account("bob", ".", "EXAMPLE").as_deref(), Ok("bob@example.test"));
        assert_eq!(d.account("bob", "", "rdp01").as_deref(), Ok("bob@rdp01"));
        assert_eq!(d.account(".\\bob", "", "rdp01").as_deref(), Ok("bob@rdp01"));
    }

    #[test]
    fn contradictions_are_refused() {
        let d = example();
        assert!(d.account("alice@example.test", "OTHER", "").is_err());
        assert!(d.account("alice@example.test", "other.test", "").is_err());
        assert!(d.account("OTHER\\alice", "EXAMPLE", "").is_err());
        // An unmapped NetBIOS name beside a UPN cannot be told apart: accepted.
        assert!(Domains::default().account("alice@example.test", "EXAMPLE", "").is_ok());
        // But a mapped one that maps elsewhere is a contradiction.
        let two = Domains::new([("EXAMPLE", "example.test"), ("OTHER", "other.test")]).expect("valid");
        assert!(two.account("alice@example.test", "OTHER", "").is_err());
    }

    #[test]
    fn bad_domain_pairs_are_named() {
        assert!(Domains::new([("EXAMPLE.TEST", "example.test")]).is_err());
        assert!(Domains::new([("EXAMPLE", "example")]).is_err());
    }

    #[test]
    fn dns_are_compared_without_case_or_spaces() {
        assert_eq!(
            dn(" CN=Alice Smith , CN=Users,DC=Example, DC=test"),
            "dn:cn=alice smith,cn=users,dc=example,dc=test"
        );
        assert_eq!(dn("uid=a\\,b,ou=People"), "dn:uid=a\\,b,ou=people");
        assert_eq!(dn("uid=alice,ou=people"), dn("UID = alice , OU = People"));
    }
}
