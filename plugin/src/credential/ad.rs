//! Active Directory's `data <hex>` sub-code in a bind's diagnostic message:
//! `80090308: LdapErr: DSID-0C09044E, comment: AcceptSecurityContext error, data 52e, v4563`.
//! Only the `data` value is parsed; DSID and version differ between servers.

use crate::cause::Cause;

/// The hex sub-code after `data `, lower-cased, or `None` when the message has none.
pub fn parse_data_code(message: &str) -> Option<String> {
    let mut rest = message;
    while let Some(i) = rest.find("data ") {
        // `data` must start a word: beginning of the message, or after a space or comma.
        let word_start = i == 0 || matches!(rest.as_bytes()[i - 1], b' ' | b',');
        let after = &rest[i + 5..];
        let hex: String = after.chars().take_while(char::is_ascii_hexdigit).collect();
        let ends_ok = after[hex.len()..]
            .chars()
            .next()
            .is_none_or(|c| matches!(c, ',' | ' ' | '\0'));
        if word_start && !hex.is_empty() && hex.len() <= 8 && ends_ok {
            return Some(hex.to_ascii_lowercase());
        }
        rest = after;
    }
    None
}

/// The cause an AD sub-code on resultCode 49 means, if it is one of the known ones.
pub fn cause_for_data_code(code: &str) -> Option<Cause> {
    Some(match code {
        "525" => Cause::CredAccountNotFound,
        "52e" => Cause::CredInvalid,
        "530" => Cause::CredLogonHours,
        "531" => Cause::CredWorkstationRestricted,
        "532" => Cause::CredPasswordExpired,
        "533" => Cause::CredAccountDisabled,
        "568" => Cause::CredTokenTooLarge,
        "701" => Cause::CredAccountExpired,
        "773" => Cause::CredPasswordMustChange,
        "775" => Cause::CredAccountLocked,
        _ => return None,
    })
}

/// AD reports these only when the password itself is right.
pub fn proves_password_right(code: &str) -> bool {
    matches!(code, "530" | "531" | "532" | "773")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_data_value_only() {
        let m = "80090308: LdapErr: DSID-0C09044E, comment: AcceptSecurityContext error, data 52e, v4563";
        assert_eq!(parse_data_code(m).as_deref(), Some("52e"));
        let m = "80090308: LdapErr: DSID-0C090447, comment: AcceptSecurityContext error, data 775, v2580\0";
        assert_eq!(parse_data_code(m).as_deref(), Some("775"));
        let m = "8009030C: LdapErr: DSID-0C0906A1, comment: AcceptSecurityContext error, data 52E, v3839";
        assert_eq!(parse_data_code(m).as_deref(), Some("52e"));
        assert_eq!(parse_data_code("data 701"), Some("701".into()));
        assert_eq!(parse_data_code(""), None);
        assert_eq!(parse_data_code("Invalid credentials"), None);
        assert_eq!(parse_data_code("metadata 52e, v1"), None);
        assert_eq!(parse_data_code("data zz, data 530, v1"), Some("530".into()));
        assert_eq!(parse_data_code("data 52eq"), None);
        assert_eq!(parse_data_code("data ∂∂∂"), None);
    }

    #[test]
    fn maps_the_documented_codes() {
        for (code, cause) in [
            ("525", Cause::CredAccountNotFound),
            ("52e", Cause::CredInvalid),
            ("530", Cause::CredLogonHours),
            ("531", Cause::CredWorkstationRestricted),
            ("532", Cause::CredPasswordExpired),
            ("533", Cause::CredAccountDisabled),
            ("568", Cause::CredTokenTooLarge),
            ("701", Cause::CredAccountExpired),
            ("773", Cause::CredPasswordMustChange),
            ("775", Cause::CredAccountLocked),
        ] {
            assert_eq!(cause_for_data_code(code), Some(cause), "{code}");
        }
        assert_eq!(cause_for_data_code("52f"), None);
        assert!(proves_password_right("773") && !proves_password_right("52e"));
    }
}
