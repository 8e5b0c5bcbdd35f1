//! Escaping user input: RFC 4514 for attribute values inside a DN, RFC 4515 for search filters.

use std::fmt::Write as _;

/// Escapes a value for use as an RDN attribute value (RFC 4514 section 2.4).
pub fn dn_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 8);
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        match c {
            '"' | '+' | ',' | ';' | '<' | '>' | '\\' | '=' => {
                out.push('\\');
                out.push(c);
            }
            '#' if i == 0 => out.push_str("\\#"),
            ' ' if i == 0 || i == last => out.push_str("\\ "),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// Escapes a value for use inside a search filter assertion (RFC 4515 section 3).
pub fn filter_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 8);
    for c in value.chars() {
        match c {
            '*' => out.push_str("\\2a"),
            '(' => out.push_str("\\28"),
            ')' => out.push_str("\\29"),
            '\\' => out.push_str("\\5c"),
            '\0' => out.push_str("\\00"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc4514_specials() {
        assert_eq!(dn_value("alice"), "alice");
        assert_eq!(dn_value("a,b+c\"d\\e<f>g;h=i"), "a\\,b\\+c\\\"d\\\\e\\<f\\>g\\;h\\=i");
        assert_eq!(dn_value("#x"), "\\#x");
        assert_eq!(dn_value("x#"), "x#");
        assert_eq!(dn_value(" x "), "\\ x\\ ");
        assert_eq!(dn_value("a\0b\nc"), "a\\00b\\0ac");
        assert_eq!(dn_value("Jörg"), "Jörg");
        assert_eq!(dn_value(""), "");
        assert_eq!(dn_value(" "), "\\ ");
    }

    #[test]
    fn rfc4515_specials() {
        assert_eq!(filter_value("alice"), "alice");
        assert_eq!(filter_value("*)(uid=*"), "\\2a\\29\\28uid=\\2a");
        assert_eq!(filter_value("a\\b\0"), "a\\5cb\\00");
    }
}
