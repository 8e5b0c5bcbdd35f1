//! TSRequest (MS-CSSP 2.2.1), DER:
//!
//! ```text
//! TSRequest ::= SEQUENCE {
//!     version     [0] INTEGER,
//!     negoTokens  [1] NegoData OPTIONAL,       -- SEQUENCE OF SEQUENCE { negoToken [0] OCTET STRING }
//!     authInfo    [2] OCTET STRING OPTIONAL,
//!     pubKeyAuth  [3] OCTET STRING OPTIONAL,
//!     errorCode   [4] INTEGER OPTIONAL,        -- an NTSTATUS, version 3 and later
//!     clientNonce [5] OCTET STRING OPTIONAL    -- version 5 and later
//! }
//! ```
//!
//! The decoder checks every length against what is left before reading, refuses indefinite
//! lengths and messages over [`MAX_LEN`], skips unknown context tags (a later version may add
//! fields) and never panics.

/// The largest TSRequest accepted (a CHALLENGE or a pubKeyAuth answer is a few hundred bytes).
pub const MAX_LEN: usize = 64 * 1024;

/// A TSRequest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TsRequest {
    /// version.
    pub version: u32,
    /// negoTokens, in order.
    pub nego_tokens: Vec<Vec<u8>>,
    /// authInfo (TSCredentials, encrypted): never sent by this client.
    pub auth_info: Option<Vec<u8>>,
    /// pubKeyAuth.
    pub pub_key_auth: Option<Vec<u8>>,
    /// errorCode, as the 32-bit NTSTATUS.
    pub error_code: Option<u32>,
    /// clientNonce.
    pub client_nonce: Option<Vec<u8>>,
}

/// Why bytes are not a TSRequest.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The first byte is not a SEQUENCE tag.
    #[error("not a TSRequest (first byte 0x{0:02x}, expected a DER SEQUENCE)")]
    NotSequence(u8),
    /// A length runs past the end of its container.
    #[error("truncated {0}")]
    Truncated(&'static str),
    /// Indefinite or over-long length form.
    #[error("unsupported DER length form in {0}")]
    BadLength(&'static str),
    /// Larger than [`MAX_LEN`].
    #[error("TSRequest of {0} bytes exceeds the limit")]
    TooLong(usize),
    /// A tag where another was required.
    #[error("unexpected tag 0x{tag:02x} in {what}")]
    UnexpectedTag {
        /// The tag found.
        tag: u8,
        /// Where.
        what: &'static str,
    },
    /// An INTEGER that does not fit.
    #[error("INTEGER out of range in {0}")]
    BadInteger(&'static str),
    /// No version field.
    #[error("TSRequest without a version")]
    MissingVersion,
    /// Bytes after the outer SEQUENCE.
    #[error("{0} bytes after the TSRequest")]
    Trailing(usize),
}

/// Reads a DER length at `b[at..]`: (length, bytes used), `None` when more bytes are needed.
fn read_len(b: &[u8], at: usize, what: &'static str) -> Result<Option<(usize, usize)>, DecodeError> {
    let Some(&first) = b.get(at) else {
        return Ok(None);
    };
    match first {
        0..=0x7f => Ok(Some((first as usize, 1))),
        0x81..=0x84 => {
            let n = (first & 0x7f) as usize;
            let Some(bytes) = b.get(at + 1..at + 1 + n) else {
                return Ok(None);
            };
            let len = bytes.iter().fold(0usize, |acc, &x| (acc << 8) | x as usize);
            Ok(Some((len, 1 + n)))
        }
        _ => Err(DecodeError::BadLength(what)),
    }
}

/// How long the TSRequest at the start of `buf` is, once its header has arrived: `Ok(None)`
/// means read more; an error means the peer is not sending a TSRequest.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, DecodeError> {
    let Some(&tag) = buf.first() else {
        return Ok(None);
    };
    if tag != 0x30 {
        return Err(DecodeError::NotSequence(tag));
    }
    let Some((len, used)) = read_len(buf, 1, "TSRequest")? else {
        return Ok(None);
    };
    let total = 1 + used + len;
    if total > MAX_LEN {
        return Err(DecodeError::TooLong(total));
    }
    Ok(Some(total))
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn new(b: &'a [u8]) -> Self {
        Reader { b, at: 0 }
    }

    fn done(&self) -> bool {
        self.at >= self.b.len()
    }

    /// One TLV: (tag, contents).
    fn tlv(&mut self, what: &'static str) -> Result<(u8, &'a [u8]), DecodeError> {
        let tag = *self.b.get(self.at).ok_or(DecodeError::Truncated(what))?;
        let (len, used) = read_len(self.b, self.at + 1, what)?.ok_or(DecodeError::Truncated(what))?;
        let start = self.at + 1 + used;
        let end = start.checked_add(len).ok_or(DecodeError::Truncated(what))?;
        let content = self.b.get(start..end).ok_or(DecodeError::Truncated(what))?;
        self.at = end;
        Ok((tag, content))
    }

    fn expect(&mut self, want: u8, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let (tag, content) = self.tlv(what)?;
        if tag != want {
            return Err(DecodeError::UnexpectedTag { tag, what });
        }
        Ok(content)
    }
}

/// The single TLV a context-specific wrapper holds.
fn inner(content: &[u8], want: u8, what: &'static str) -> Result<Vec<u8>, DecodeError> {
    let mut r = Reader::new(content);
    let v = r.expect(want, what)?;
    if !r.done() {
        return Err(DecodeError::Trailing(content.len() - r.at));
    }
    Ok(v.to_vec())
}

fn integer(content: &[u8], what: &'static str) -> Result<i64, DecodeError> {
    let v = inner(content, 0x02, what)?;
    if v.is_empty() || v.len() > 8 {
        return Err(DecodeError::BadInteger(what));
    }
    let neg = v[0] & 0x80 != 0;
    let mut x: i64 = if neg { -1 } else { 0 };
    for b in v {
        x = (x << 8) | i64::from(b);
    }
    Ok(x)
}

/// Decodes exactly one TSRequest (`b` must hold it and nothing else).
pub fn decode(b: &[u8]) -> Result<TsRequest, DecodeError> {
    if let Some(&t) = b.first() {
        if t != 0x30 {
            return Err(DecodeError::NotSequence(t));
        }
    }
    if b.len() > MAX_LEN {
        return Err(DecodeError::TooLong(b.len()));
    }
    let mut outer = Reader::new(b);
    let body = outer.expect(0x30, "TSRequest")?;
    if !outer.done() {
        return Err(DecodeError::Trailing(b.len() - outer.at));
    }
    let mut r = Reader::new(body);
    let mut ts = TsRequest::default();
    let mut version = None;
    while !r.done() {
        let (tag, content) = r.tlv("TSRequest field")?;
        match tag {
            0xa0 => {
                let v = integer(content, "version")?;
                version = Some(u32::try_from(v).map_err(|_| DecodeError::BadInteger("version"))?);
            }
            0xa1 => {
                let seq = inner(content, 0x30, "negoTokens")?;
                let mut items = Reader::new(&seq);
                while !items.done() {
                    let item = items.expect(0x30, "NegoData item")?;
                    let mut fields = Reader::new(item);
                    let wrapped = fields.expect(0xa0, "negoToken")?;
                    ts.nego_tokens.push(inner(wrapped, 0x04, "negoToken")?);
                }
            }
            0xa2 => ts.auth_info = Some(inner(content, 0x04, "authInfo")?),
            0xa3 => ts.pub_key_auth = Some(inner(content, 0x04, "pubKeyAuth")?),
            0xa4 => {
                let v = integer(content, "errorCode")?;
                // NTSTATUS values arrive as negative 32-bit INTEGERs (or, from some encoders,
                // as positive ones with a leading zero byte).
                let code = if v < 0 {
                    i32::try_from(v).ok().map(|x| x as u32)
                } else {
                    u32::try_from(v).ok()
                };
                ts.error_code = Some(code.ok_or(DecodeError::BadInteger("errorCode"))?);
            }
            0xa5 => ts.client_nonce = Some(inner(content, 0x04, "clientNonce")?),
            0xa6..=0xbf => {} // a later version's field: skip it
            other => {
                return Err(DecodeError::UnexpectedTag {
                    tag: other,
                    what: "TSRequest field",
                })
            }
        }
    }
    ts.version = version.ok_or(DecodeError::MissingVersion)?;
    Ok(ts)
}

fn push_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = (len as u32).to_be_bytes();
        let skip = bytes.iter().take_while(|&&b| b == 0).count();
        out.push(0x80 | (4 - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
}

pub(crate) fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 6);
    out.push(tag);
    push_len(&mut out, content.len());
    out.extend_from_slice(content);
    out
}

/// Minimal two's-complement INTEGER contents.
fn int_bytes(v: i64) -> Vec<u8> {
    let b = v.to_be_bytes();
    let mut i = 0;
    while i < 7 && ((b[i] == 0 && b[i + 1] & 0x80 == 0) || (b[i] == 0xff && b[i + 1] & 0x80 != 0)) {
        i += 1;
    }
    b[i..].to_vec()
}

/// Encodes a TSRequest (errorCode as a signed 32-bit INTEGER, the way Windows sends it).
pub fn encode(ts: &TsRequest) -> Vec<u8> {
    let mut body = tlv(0xa0, &tlv(0x02, &int_bytes(i64::from(ts.version))));
    if !ts.nego_tokens.is_empty() {
        let items: Vec<u8> = ts
            .nego_tokens
            .iter()
            .flat_map(|t| tlv(0x30, &tlv(0xa0, &tlv(0x04, t))))
            .collect();
        body.extend(tlv(0xa1, &tlv(0x30, &items)));
    }
    if let Some(a) = &ts.auth_info {
        body.extend(tlv(0xa2, &tlv(0x04, a)));
    }
    if let Some(p) = &ts.pub_key_auth {
        body.extend(tlv(0xa3, &tlv(0x04, p)));
    }
    if let Some(e) = ts.error_code {
        body.extend(tlv(0xa4, &tlv(0x02, &int_bytes(i64::from(e as i32)))));
    }
    if let Some(n) = &ts.client_nonce {
        body.extend(tlv(0xa5, &tlv(0x04, n)));
    }
    tlv(0x30, &body)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn sample() -> TsRequest {
        TsRequest {
            version: 6,
            nego_tokens: vec![b"NTLMSSP\0token".to_vec()],
            auth_info: None,
            pub_key_auth: Some(vec![0xab; 300]),
            error_code: None,
            client_nonce: Some(vec![7; 32]),
        }
    }

    #[test]
    fn round_trips() {
        for ts in [
            sample(),
            TsRequest {
                version: 2,
                ..TsRequest::default()
            },
            TsRequest {
                version: 6,
                error_code: Some(0xC000_006D),
                ..TsRequest::default()
            },
            TsRequest {
                version: 3,
                error_code: Some(0x0000_0005),
                nego_tokens: vec![vec![], vec![1, 2, 3]],
                auth_info: Some(vec![9; 2]),
                ..TsRequest::default()
            },
        ] {
            let b = encode(&ts);
            assert_eq!(frame_len(&b), Ok(Some(b.len())));
            assert_eq!(decode(&b), Ok(ts));
        }
    }

    #[test]
    fn windows_error_code_bytes() {
        // 30 0d a0 03 02 01 06 a4 06 02 04 c0 00 00 6d: version 6, errorCode 0xC000006D.
        let b = [
            0x30, 0x0d, 0xa0, 0x03, 0x02, 0x01, 0x06, 0xa4, 0x06, 0x02, 0x04, 0xc0, 0x00, 0x00, 0x6d,
        ];
        assert_eq!(encode(&decode(&b).expect("decode")), b);
        assert_eq!(decode(&b).map(|t| t.error_code), Ok(Some(0xC000_006D)));
        // The same status as a positive INTEGER with a leading zero.
        let p = [
            0x30, 0x0e, 0xa0, 0x03, 0x02, 0x01, 0x06, 0xa4, 0x07, 0x02, 0x05, 0x00, 0xc0, 0x00, 0x00, 0x6d,
        ];
        assert_eq!(decode(&p).map(|t| t.error_code), Ok(Some(0xC000_006D)));
    }

    #[test]
    fn framing_and_hostile_headers() {
        let b = encode(&sample());
        assert_eq!(frame_len(&[]), Ok(None));
        assert_eq!(frame_len(&b[..1]), Ok(None));
        assert_eq!(frame_len(&b[..2]), Ok(None), "long form needs its length bytes");
        assert_eq!(frame_len(&[0x03, 0x00]), Err(DecodeError::NotSequence(0x03)));
        assert_eq!(frame_len(&[0x30, 0x80]), Err(DecodeError::BadLength("TSRequest")));
        assert!(matches!(
            frame_len(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]),
            Err(DecodeError::TooLong(_))
        ));
        for n in 0..b.len() {
            assert!(decode(&b[..n]).is_err(), "prefix {n} decoded");
        }
        let mut extra = b.clone();
        extra.push(0);
        assert!(matches!(decode(&extra), Err(DecodeError::Trailing(1))));
        // No version.
        assert_eq!(decode(&[0x30, 0x00]), Err(DecodeError::MissingVersion));
        // A negative version.
        assert_eq!(
            decode(&[0x30, 0x05, 0xa0, 0x03, 0x02, 0x01, 0xff]),
            Err(DecodeError::BadInteger("version"))
        );
        // An unknown later field is skipped.
        assert_eq!(
            decode(&[0x30, 0x09, 0xa0, 0x03, 0x02, 0x01, 0x07, 0xa9, 0x02, 0x05, 0x00]).map(|t| t.version),
            Ok(7)
        );
    }

    proptest! {
        #[test]
        fn decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = frame_len(&bytes);
            let _ = decode(&bytes);
        }

        #[test]
        fn mutated_valid_messages_never_panic(pos in 0usize..400, val in any::<u8>(), cut in 0usize..400) {
            let mut b = encode(&sample());
            let p = pos % b.len();
            b[p] = val;
            b.truncate(cut.max(1).min(b.len()));
            let _ = frame_len(&b);
            let _ = decode(&b);
        }

        #[test]
        fn any_request_round_trips(version in 0u32..10, tokens in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..3),
                                   pka in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..200)),
                                   code in proptest::option::of(any::<u32>())) {
            let ts = TsRequest { version, nego_tokens: tokens, pub_key_auth: pka, error_code: code, ..TsRequest::default() };
            prop_assert_eq!(decode(&encode(&ts)), Ok(ts));
        }
    }
}
