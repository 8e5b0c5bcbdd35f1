//! The CredSSP (MS-CSSP) server of the `nla_*` targets, after their TLS handshake: TSRequest
//! DER encoding and decoding, the server's TLS SubjectPublicKey, and a sans-IO state machine
//! that answers the client's NTLM NEGOTIATE with a CHALLENGE, judges the AUTHENTICATE and the
//! client's pubKeyAuth, and answers with its own pubKeyAuth, an errorCode, or nothing.
//! `targets.rs` moves the bytes.
//!
//! ```text
//! TSRequest ::= SEQUENCE {                      -- MS-CSSP 2.2.1, EXPLICIT tags
//!     version     [0] INTEGER,
//!     negoTokens  [1] NegoData OPTIONAL,        -- SEQUENCE OF SEQUENCE { negoToken [0] OCTET STRING }
//!     authInfo    [2] OCTET STRING OPTIONAL,
//!     pubKeyAuth  [3] OCTET STRING OPTIONAL,
//!     errorCode   [4] INTEGER OPTIONAL,         -- version 3 and later
//!     clientNonce [5] OCTET STRING OPTIONAL }   -- version 5 and later
//! ```

use ring::digest;
use tracing::{debug, warn};

use crate::{
    ntlm::{self, av, Authenticate, SessionSecurity, Side},
    scenario::{Behavior, TargetSpec, STATUS_LOGON_FAILURE},
};

/// NetBIOS domain name of every NLA target.
pub(crate) const NB_DOMAIN: &str = "SIMDOM";
/// DNS domain (and forest) name of every NLA target.
pub(crate) const DNS_DOMAIN: &str = "simdom.test";
/// The OS version the CHALLENGE's Version field announces: Windows Server 2019 (10.0.17763).
pub(crate) const OS_VERSION: (u8, u8, u16) = (10, 0, 17763);
/// Largest TSRequest the targets read (the outer SEQUENCE, header included).
pub(crate) const MAX_TS_REQUEST: usize = 64 * 1024;
/// errorCode for protocol faults (a malformed AUTHENTICATE, a bad MIC or pubKeyAuth):
/// SEC_E_INVALID_TOKEN.
pub(crate) const SEC_E_INVALID_TOKEN: u32 = 0x8009_0308;

const NTSTATUS_ACCOUNT_DISABLED: u32 = 0xC000_0072;
const NTSTATUS_ACCOUNT_LOCKED_OUT: u32 = 0xC000_0234;
const NTSTATUS_ACCOUNT_EXPIRED: u32 = 0xC000_0193;
const NTSTATUS_PASSWORD_EXPIRED: u32 = 0xC000_0071;
const NTSTATUS_PASSWORD_MUST_CHANGE: u32 = 0xC000_0224;
const NTSTATUS_INVALID_LOGON_HOURS: u32 = 0xC000_006F;
const NTSTATUS_INVALID_WORKSTATION: u32 = 0xC000_0070;
const NTSTATUS_TOO_MANY_CONTEXT_IDS: u32 = 0xC000_015A;

const CLIENT_SERVER_HASH_MAGIC: &[u8] = b"CredSSP Client-To-Server Binding Hash\0";
const SERVER_CLIENT_HASH_MAGIC: &[u8] = b"CredSSP Server-To-Client Binding Hash\0";

// ---------------------------------------------------------------- DER

/// Malformed DER.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum DerError {
    /// Fewer bytes than a header or length announces.
    #[error("truncated")]
    Truncated,
    /// Another tag than the structure requires.
    #[error("tag {got:#04x} where {want:#04x} belongs")]
    Tag {
        /// Tag found.
        got: u8,
        /// Tag required.
        want: u8,
    },
    /// Indefinite length, a length of more than 4 octets, or a high tag number.
    #[error("unsupported tag or length form")]
    Form,
    /// Larger than [`MAX_TS_REQUEST`].
    #[error("{0} bytes is above the {MAX_TS_REQUEST}-byte limit")]
    TooLarge(usize),
    /// An INTEGER that is empty or out of range.
    #[error("bad INTEGER")]
    Integer,
    /// Bytes left after a structure, or fields out of order.
    #[error("unexpected bytes: {0}")]
    Unexpected(&'static str),
}

/// A cursor over DER TLVs (single-byte tags, definite lengths of up to 4 octets).
pub(crate) struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Reader { rest: bytes }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    fn peek_tag(&self) -> Option<u8> {
        self.rest.first().copied()
    }

    pub(crate) fn read_any(&mut self) -> Result<(u8, &'a [u8]), DerError> {
        let (&tag, rest) = self.rest.split_first().ok_or(DerError::Truncated)?;
        if tag & 0x1f == 0x1f {
            return Err(DerError::Form);
        }
        let (&first, rest) = rest.split_first().ok_or(DerError::Truncated)?;
        let (len, rest) = if first < 0x80 {
            (usize::from(first), rest)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 {
                return Err(DerError::Form);
            }
            let (octets, rest) = rest.split_at_checked(n).ok_or(DerError::Truncated)?;
            let len = octets.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
            (usize::try_from(len).map_err(|_| DerError::Truncated)?, rest)
        };
        let (content, rest) = rest.split_at_checked(len).ok_or(DerError::Truncated)?;
        self.rest = rest;
        Ok((tag, content))
    }

    pub(crate) fn read(&mut self, want: u8) -> Result<&'a [u8], DerError> {
        match self.read_any()? {
            (tag, content) if tag == want => Ok(content),
            (got, _) => Err(DerError::Tag { got, want }),
        }
    }

    /// The content of context tag `[n]` (constructed) when it comes next.
    pub(crate) fn explicit(&mut self, n: u8) -> Result<Option<Reader<'a>>, DerError> {
        let tag = 0xa0 | n;
        if self.peek_tag() != Some(tag) {
            return Ok(None);
        }
        Ok(Some(Reader::new(self.read(tag)?)))
    }

    /// `[n] { <one TLV of tag want> }`, if present.
    pub(crate) fn explicit_single(&mut self, n: u8, want: u8) -> Result<Option<&'a [u8]>, DerError> {
        let Some(mut inner) = self.explicit(n)? else {
            return Ok(None);
        };
        let content = inner.read(want)?;
        if !inner.is_empty() {
            return Err(DerError::Unexpected("more than one value in an explicit tag"));
        }
        Ok(Some(content))
    }
}

const SEQUENCE: u8 = 0x30;
const INTEGER: u8 = 0x02;
const OCTET_STRING: u8 = 0x04;
const BIT_STRING: u8 = 0x03;

pub(crate) fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 6);
    out.push(tag);
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let octets = (len as u64).to_be_bytes();
        let skip = octets.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (8 - skip) as u8);
        out.extend_from_slice(&octets[skip..]);
    }
    out.extend_from_slice(content);
    out
}

fn explicit(n: u8, inner: &[u8]) -> Vec<u8> {
    tlv(0xa0 | n, inner)
}

/// A minimal two's complement INTEGER.
fn integer(value: i64) -> Vec<u8> {
    let b = value.to_be_bytes();
    let mut start = 0;
    while start < 7
        && ((b[start] == 0x00 && b[start + 1] & 0x80 == 0) || (b[start] == 0xff && b[start + 1] & 0x80 != 0))
    {
        start += 1;
    }
    tlv(INTEGER, &b[start..])
}

fn decode_integer(content: &[u8]) -> Result<i64, DerError> {
    if content.is_empty() || content.len() > 8 {
        return Err(DerError::Integer);
    }
    let fill = if content[0] & 0x80 != 0 { 0xff } else { 0x00 };
    let mut b = [fill; 8];
    b[8 - content.len()..].copy_from_slice(content);
    Ok(i64::from_be_bytes(b))
}

/// Total length (header included) of the DER element whose first bytes are `header`: the tag
/// and the complete length octets. `Ok(None)`: more length octets are needed (read
/// `header[1] & 0x7f` of them). Used to frame TSRequests on the TLS stream.
pub(crate) fn frame_length(header: &[u8]) -> Result<Option<usize>, DerError> {
    match header {
        [] | [_] => Ok(None),
        [tag, ..] if *tag != SEQUENCE => Err(DerError::Tag {
            got: *tag,
            want: SEQUENCE,
        }),
        [_, first, rest @ ..] => {
            let (len, header_len) = if *first < 0x80 {
                (usize::from(*first), 2)
            } else {
                let n = usize::from(first & 0x7f);
                if n == 0 || n > 4 {
                    return Err(DerError::Form);
                }
                let Some(octets) = rest.get(..n) else {
                    return Ok(None);
                };
                let len = octets.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
                (usize::try_from(len).unwrap_or(usize::MAX), 2 + n)
            };
            let total = len.saturating_add(header_len);
            if total > MAX_TS_REQUEST {
                return Err(DerError::TooLarge(total));
            }
            Ok(Some(total))
        }
    }
}

/// A TSRequest (MS-CSSP 2.2.1).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct TsRequest {
    /// version.
    pub(crate) version: u32,
    /// negoTokens: the SPNEGO / NTLM tokens, in order.
    pub(crate) nego_tokens: Vec<Vec<u8>>,
    /// authInfo: the sealed TSCredentials.
    pub(crate) auth_info: Option<Vec<u8>>,
    /// pubKeyAuth: the sealed public-key binding.
    pub(crate) pub_key_auth: Option<Vec<u8>>,
    /// errorCode: an NTSTATUS (or SECURITY_STATUS).
    pub(crate) error_code: Option<u32>,
    /// clientNonce (32 bytes).
    pub(crate) client_nonce: Option<Vec<u8>>,
}

impl TsRequest {
    /// DER encoding. errorCode is encoded as Windows does: a signed 32-bit INTEGER
    /// (0xC000006D becomes `02 04 c0 00 00 6d`).
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut body = explicit(0, &integer(i64::from(self.version)));
        if !self.nego_tokens.is_empty() {
            let items: Vec<u8> = self
                .nego_tokens
                .iter()
                .flat_map(|t| tlv(SEQUENCE, &explicit(0, &tlv(OCTET_STRING, t))))
                .collect();
            body.extend(explicit(1, &tlv(SEQUENCE, &items)));
        }
        if let Some(a) = &self.auth_info {
            body.extend(explicit(2, &tlv(OCTET_STRING, a)));
        }
        if let Some(p) = &self.pub_key_auth {
            body.extend(explicit(3, &tlv(OCTET_STRING, p)));
        }
        if let Some(code) = self.error_code {
            body.extend(explicit(4, &integer(i64::from(code as i32))));
        }
        if let Some(n) = &self.client_nonce {
            body.extend(explicit(5, &tlv(OCTET_STRING, n)));
        }
        tlv(SEQUENCE, &body)
    }

    /// Decodes exactly one TSRequest. Fields must come in tag order; unknown fields and
    /// trailing bytes are errors. errorCode may be encoded signed (Windows) or unsigned.
    pub(crate) fn decode(bytes: &[u8]) -> Result<TsRequest, DerError> {
        if bytes.len() > MAX_TS_REQUEST {
            return Err(DerError::TooLarge(bytes.len()));
        }
        let mut outer = Reader::new(bytes);
        let mut r = Reader::new(outer.read(SEQUENCE)?);
        if !outer.is_empty() {
            return Err(DerError::Unexpected("bytes after the TSRequest"));
        }
        let version = r
            .explicit_single(0, INTEGER)?
            .ok_or(DerError::Unexpected("no version"))?;
        let version = u32::try_from(decode_integer(version)?).map_err(|_| DerError::Integer)?;
        let mut request = TsRequest {
            version,
            ..TsRequest::default()
        };
        if let Some(mut nego) = r.explicit(1)? {
            let mut items = Reader::new(nego.read(SEQUENCE)?);
            if !nego.is_empty() {
                return Err(DerError::Unexpected("more than one NegoData"));
            }
            while !items.is_empty() {
                let mut item = Reader::new(items.read(SEQUENCE)?);
                let token = item
                    .explicit_single(0, OCTET_STRING)?
                    .ok_or(DerError::Unexpected("NegoData item without negoToken"))?;
                if !item.is_empty() {
                    return Err(DerError::Unexpected("NegoData item"));
                }
                request.nego_tokens.push(token.to_vec());
            }
        }
        request.auth_info = r.explicit_single(2, OCTET_STRING)?.map(<[u8]>::to_vec);
        request.pub_key_auth = r.explicit_single(3, OCTET_STRING)?.map(<[u8]>::to_vec);
        if let Some(code) = r.explicit_single(4, INTEGER)? {
            let code = decode_integer(code)?;
            request.error_code = Some(if let Ok(signed) = i32::try_from(code) {
                signed as u32
            } else {
                u32::try_from(code).map_err(|_| DerError::Integer)?
            });
        }
        request.client_nonce = r.explicit_single(5, OCTET_STRING)?.map(<[u8]>::to_vec);
        if !r.is_empty() {
            return Err(DerError::Unexpected("unknown or out-of-order TSRequest field"));
        }
        Ok(request)
    }
}

/// The SubjectPublicKey of an X.509 certificate: the contents of the BIT STRING in its
/// SubjectPublicKeyInfo, without the unused-bits octet (for RSA the RSAPublicKey DER, for EC
/// the point `04 || X || Y`). This is what CredSSP's pubKeyAuth binds to.
pub(crate) fn subject_public_key(certificate: &[u8]) -> Result<Vec<u8>, DerError> {
    let mut outer = Reader::new(certificate);
    let mut cert = Reader::new(outer.read(SEQUENCE)?);
    let mut tbs = Reader::new(cert.read(SEQUENCE)?);
    tbs.explicit(0)?; // version, optional
    tbs.read(INTEGER)?; // serialNumber
    tbs.read(SEQUENCE)?; // signature AlgorithmIdentifier
    tbs.read(SEQUENCE)?; // issuer
    tbs.read(SEQUENCE)?; // validity
    tbs.read(SEQUENCE)?; // subject
    let mut spki = Reader::new(tbs.read(SEQUENCE)?);
    spki.read(SEQUENCE)?; // algorithm
    match spki.read(BIT_STRING)?.split_first() {
        Some((0, key)) if !key.is_empty() => Ok(key.to_vec()),
        _ => Err(DerError::Unexpected("SubjectPublicKey with unused bits or empty")),
    }
}

/// SHA-256 of the concatenation of `parts`.
pub(crate) fn sha256(parts: &[&[u8]]) -> Vec<u8> {
    let mut ctx = digest::Context::new(&digest::SHA256);
    for p in parts {
        ctx.update(p);
    }
    ctx.finish().as_ref().to_vec()
}

/// The client's pubKeyAuth plaintext (MS-CSSP 3.1.5): version 5 and later
/// SHA256("CredSSP Client-To-Server Binding Hash\0" || nonce || key), before that the key.
pub(crate) fn client_binding(version: u32, nonce: &[u8], public_key: &[u8]) -> Vec<u8> {
    if version >= 5 {
        sha256(&[CLIENT_SERVER_HASH_MAGIC, nonce, public_key])
    } else {
        public_key.to_vec()
    }
}

/// The server's pubKeyAuth plaintext: version 5 and later
/// SHA256("CredSSP Server-To-Client Binding Hash\0" || nonce || key), before that the key
/// plus one (a little-endian increment, which touches only its first byte unless it is 0xff).
pub(crate) fn server_binding(version: u32, nonce: &[u8], public_key: &[u8]) -> Vec<u8> {
    if version >= 5 {
        sha256(&[SERVER_CLIENT_HASH_MAGIC, nonce, public_key])
    } else {
        let mut key = public_key.to_vec();
        for b in &mut key {
            *b = b.wrapping_add(1);
            if *b != 0 {
                break;
            }
        }
        key
    }
}

// ---------------------------------------------------------------- the server

/// What to do after a TSRequest from the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Reply {
    /// Send this TSRequest and read the next one.
    Continue(Vec<u8>),
    /// Send this TSRequest (the server's pubKeyAuth); then wait briefly for TSCredentials and
    /// close.
    Authenticated(Vec<u8>),
    /// Send this TSRequest (an errorCode) and close.
    Refuse(Vec<u8>),
    /// Close without answering.
    Close,
}

enum State {
    Negotiate,
    /// Kerberos: the AP-REQ was accepted, the client's pubKeyAuth comes next.
    KerberosPubKey(Box<crate::kerberos::Context>),
    Authenticate {
        negotiate: Vec<u8>,
        challenge: Vec<u8>,
    },
    Credentials(Box<SessionSecurity>),
    Done,
}

/// One CredSSP conversation on one TLS connection of an `nla_*` target.
pub(crate) struct CredSspServer<'a> {
    spec: &'a TargetSpec,
    public_key: Vec<u8>,
    server_challenge: [u8; 8],
    unix_nanos: i128,
    state: State,
}

impl<'a> CredSspServer<'a> {
    /// A server for `spec` whose TLS certificate has `public_key` (see
    /// [`subject_public_key`]), with this NTLM server challenge and this clock reading (ns since
    /// the Unix epoch; the target's skew is added to it).
    pub(crate) fn new(spec: &'a TargetSpec, public_key: Vec<u8>, server_challenge: [u8; 8], unix_nanos: i128) -> Self {
        CredSspServer {
            spec,
            public_key,
            server_challenge,
            unix_nanos,
            state: State::Negotiate,
        }
    }

    /// Waiting for TSCredentials (read them with a short deadline; silence is not an error).
    pub(crate) fn awaiting_credentials(&self) -> bool {
        matches!(self.state, State::Credentials(_))
    }

    /// True when the next TSRequest is the client's AUTHENTICATE.
    pub(crate) fn awaiting_authenticate(&self) -> bool {
        matches!(self.state, State::Authenticate { .. })
    }

    fn version(&self) -> u32 {
        self.spec.nla.credssp_version
    }

    fn answer(&self, f: impl FnOnce(&mut TsRequest)) -> Vec<u8> {
        let mut r = TsRequest {
            version: self.version(),
            ..TsRequest::default()
        };
        f(&mut r);
        r.encode()
    }

    fn refuse(&mut self, status: u32, why: &str) -> Reply {
        self.state = State::Done;
        debug!(target = %self.spec.name, status = format_args!("{status:#010x}"), why, "refusing the logon");
        Reply::Refuse(self.answer(|r| r.error_code = Some(status)))
    }

    fn protocol_fault(&mut self, why: &str) -> Reply {
        warn!(target = %self.spec.name, why, "CredSSP protocol fault: answering SEC_E_INVALID_TOKEN");
        self.refuse(SEC_E_INVALID_TOKEN, why)
    }

    fn close(&mut self, why: &str) -> Reply {
        debug!(target = %self.spec.name, why, "closing the CredSSP conversation");
        self.state = State::Done;
        Reply::Close
    }

    /// The NetBIOS computer name, and the DNS one.
    fn computer_names(&self) -> (String, String) {
        let nb = self.spec.nla.computer.clone();
        let dns = format!("{}.{DNS_DOMAIN}", nb.to_ascii_lowercase());
        (nb, dns)
    }

    /// The CHALLENGE's target information: NetBIOS domain and computer, DNS domain, computer
    /// and tree, the server's clock (plus its skew), MsvAvEOL.
    pub(crate) fn target_info(&self) -> Vec<u8> {
        let (nb_computer, dns_computer) = self.computer_names();
        let time = ntlm::filetime(self.unix_nanos, self.spec.nla.skew_secs).to_le_bytes();
        ntlm::av_pairs(&[
            (av::NB_DOMAIN_NAME, &ntlm::utf16le(NB_DOMAIN)),
            (av::NB_COMPUTER_NAME, &ntlm::utf16le(&nb_computer)),
            (av::DNS_DOMAIN_NAME, &ntlm::utf16le(DNS_DOMAIN)),
            (av::DNS_COMPUTER_NAME, &ntlm::utf16le(&dns_computer)),
            (av::DNS_TREE_NAME, &ntlm::utf16le(DNS_DOMAIN)),
            (av::TIMESTAMP, &time),
        ])
    }

    /// Handles one complete TSRequest from the client.
    pub(crate) fn handle(&mut self, bytes: &[u8]) -> Reply {
        let request = match TsRequest::decode(bytes) {
            Ok(request) => request,
            Err(e) => {
                warn!(target = %self.spec.name, error = %e, "undecodable TSRequest");
                return self.close("undecodable TSRequest");
            }
        };
        if let Some(code) = request.error_code {
            debug!(target = %self.spec.name, code = format_args!("{code:#010x}"), "the client reported an error");
            return self.close("client errorCode");
        }
        match std::mem::replace(&mut self.state, State::Done) {
            State::Negotiate
                if request
                    .nego_tokens
                    .first()
                    .is_some_and(|t| crate::kerberos::is_spnego(t)) =>
            {
                self.on_ap_req(&request)
            }
            State::Negotiate => self.on_negotiate(&request),
            State::KerberosPubKey(ctx) => self.on_kerberos_pub_key(&request, *ctx),
            State::Authenticate { negotiate, challenge } => self.on_authenticate(&request, &negotiate, &challenge),
            State::Credentials(mut security) => {
                // Never needed by the plugin: unsealed only to see that it is well formed, and
                // neither judged nor logged.
                let well_formed = request.auth_info.as_deref().is_some_and(|a| security.unseal(a).is_ok());
                debug!(target = %self.spec.name, well_formed, "TSCredentials received (not checked)");
                self.close("TSCredentials received")
            }
            State::Done => self.close("conversation over"),
        }
    }

    /// Kerberos in SPNEGO: with a keytab, the AP-REQ is judged; without one, the answer asks
    /// for NTLM (what a server whose Kerberos is unusable does).
    fn on_ap_req(&mut self, request: &TsRequest) -> Reply {
        let token = request.nego_tokens.first().map(Vec::as_slice).unwrap_or_default();
        if self.spec.behavior == Behavior::NlaClose {
            return self.close("nla_close: closing after the AP-REQ");
        }
        let Some(keytab) = self.spec.nla.keytab.as_deref() else {
            debug!(target = %self.spec.name, "Kerberos offered, no keytab: asking for NTLM");
            self.state = State::Negotiate;
            return Reply::Continue(self.answer(|r| r.nego_tokens = vec![crate::kerberos::wants_ntlm()]));
        };
        let now = i64::try_from(self.unix_nanos / 1_000_000_000).unwrap_or(0) + self.spec.nla.skew_secs;
        let rng = ring::rand::SystemRandom::new();
        let mut random = |b: &mut [u8]| {
            use ring::rand::SecureRandom;
            let _ = rng.fill(b);
        };
        match crate::kerberos::accept(keytab, token, now, &mut random) {
            Ok((ctx, answer)) => {
                debug!(target = %self.spec.name, client = %ctx.client, "AP-REQ accepted");
                self.state = State::KerberosPubKey(Box::new(ctx));
                Reply::Continue(self.answer(|r| r.nego_tokens = vec![answer]))
            }
            Err(e) => {
                debug!(target = %self.spec.name, krb_error = e.krb_error, why = %e.why, "AP-REQ refused");
                self.state = State::Done;
                Reply::Refuse(self.answer(|r| {
                    r.error_code = Some(e.status);
                    r.nego_tokens = vec![crate::kerberos::error_token(&e, now)];
                }))
            }
        }
    }

    fn on_kerberos_pub_key(&mut self, request: &TsRequest, mut ctx: crate::kerberos::Context) -> Reply {
        // Our mechListMIC was sent: the client's is required.
        let Some(mic) = request.nego_tokens.first() else {
            return self.protocol_fault("Kerberos: no mechListMIC from the client");
        };
        if let Err(e) = ctx.verify_client_mic(mic) {
            warn!(target = %self.spec.name, error = %e, "Kerberos: bad mechListMIC");
            return self.protocol_fault("Kerberos: bad mechListMIC");
        }
        let Some(pub_key_auth) = request.pub_key_auth.as_deref() else {
            return self.protocol_fault("Kerberos: no pubKeyAuth");
        };
        let proof = match ctx.unwrap(pub_key_auth) {
            Ok(p) => p,
            Err(e) => {
                warn!(target = %self.spec.name, error = %e, "Kerberos: pubKeyAuth does not unwrap");
                return self.protocol_fault("Kerberos: pubKeyAuth does not unwrap");
            }
        };
        let version = request.version.min(self.version());
        let nonce = request.client_nonce.as_deref().unwrap_or_default();
        if version >= 5 && nonce.len() != 32 {
            return self.protocol_fault("version 5+ without a 32-byte clientNonce");
        }
        if !ntlm::ct_eq(&proof, &client_binding(version, nonce, &self.public_key)) {
            return self.protocol_fault("pubKeyAuth does not bind this server's public key");
        }
        match ctx.wrap(&server_binding(version, nonce, &self.public_key)) {
            Ok(sealed) => {
                debug!(target = %self.spec.name, client = %ctx.client, version, "Kerberos logon accepted");
                self.state = State::Done;
                Reply::Authenticated(self.answer(|r| r.pub_key_auth = Some(sealed)))
            }
            Err(_) => self.protocol_fault("Kerberos: wrap failed"),
        }
    }

    fn on_negotiate(&mut self, request: &TsRequest) -> Reply {
        let Some(token) = request.nego_tokens.first() else {
            return self.close("first TSRequest without negoTokens");
        };
        let negotiate = match ntlm::parse_negotiate(token) {
            Ok(n) => n,
            Err(e) => {
                warn!(target = %self.spec.name, error = %e, "not an NTLM NEGOTIATE (only raw NTLM is spoken)");
                return self.close("not an NTLM NEGOTIATE");
            }
        };
        let flags = ntlm::challenge_flags(negotiate.flags);
        let (major, minor, build) = OS_VERSION;
        let challenge = ntlm::challenge_message(
            flags,
            &self.server_challenge,
            NB_DOMAIN,
            &self.target_info(),
            &ntlm::version(major, minor, build),
        );
        debug!(target = %self.spec.name, client_version = request.version, flags = format_args!("{flags:#010x}"), "NEGOTIATE → CHALLENGE");
        let answer = self.answer(|r| r.nego_tokens = vec![challenge.clone()]);
        self.state = State::Authenticate {
            negotiate: token.clone(),
            challenge,
        };
        Reply::Continue(answer)
    }

    fn on_authenticate(&mut self, request: &TsRequest, negotiate: &[u8], challenge: &[u8]) -> Reply {
        match self.spec.behavior {
            Behavior::NlaClose => return self.close("nla_close: closing after the AUTHENTICATE"),
            Behavior::NlaError => return self.refuse(self.spec.nla.ntstatus, "nla_error"),
            _ => {}
        }
        let Some(token) = request.nego_tokens.first() else {
            return self.protocol_fault("second TSRequest without negoTokens");
        };
        let auth = match ntlm::parse_authenticate(token) {
            Ok(a) => a,
            Err(e) => {
                warn!(target = %self.spec.name, error = %e, "bad AUTHENTICATE");
                return self.protocol_fault("malformed AUTHENTICATE");
            }
        };
        let base_key = match self.logon(&auth) {
            Ok(key) => key,
            Err(status) if self.spec.nla.close_after_authenticate => {
                debug!(target = %self.spec.name, status = format_args!("{status:#010x}"), "logon refused");
                return self.close("close_after_authenticate: logon refused");
            }
            Err(status) => return self.refuse(status, "logon refused"),
        };
        let exported = match ntlm::exported_session_key(auth.flags, &base_key, auth.encrypted_session_key) {
            Ok(k) => k,
            Err(_) => return self.protocol_fault("EncryptedRandomSessionKey is not 16 bytes"),
        };
        if ntlm::has_mic(auth.nt_response) {
            let got = token.get(ntlm::MIC_OFFSET..ntlm::MIC_OFFSET + 16).unwrap_or_default();
            let want = ntlm::mic(&exported, negotiate, challenge, token);
            if !ntlm::ct_eq(got, &want) {
                return self.protocol_fault("MIC mismatch");
            }
        }
        if auth.flags & ntlm::flag::EXTENDED_SESSIONSECURITY == 0 {
            return self.protocol_fault("AUTHENTICATE without extended session security");
        }
        let mut security = SessionSecurity::new(&exported, auth.flags, Side::Server);
        let Some(pub_key_auth) = request.pub_key_auth.as_deref() else {
            return self.protocol_fault("AUTHENTICATE without pubKeyAuth");
        };
        let Ok(client_proof) = security.unseal(pub_key_auth) else {
            return self.protocol_fault("pubKeyAuth does not unseal (wrong keys, flags or sequence number)");
        };
        // The hashed binding is used when both sides speak version 5 or later.
        let version = request.version.min(self.version());
        let nonce = request.client_nonce.as_deref().unwrap_or_default();
        if version >= 5 && nonce.len() != 32 {
            return self.protocol_fault("version 5+ without a 32-byte clientNonce");
        }
        if !ntlm::ct_eq(&client_proof, &client_binding(version, nonce, &self.public_key)) {
            return self.protocol_fault("pubKeyAuth does not bind this server's public key");
        }
        let sealed = security.seal(&server_binding(version, nonce, &self.public_key));
        debug!(target = %self.spec.name, user = %auth.user, version, "logon accepted");
        self.state = State::Credentials(Box::new(security));
        Reply::Authenticated(self.answer(|r| r.pub_key_auth = Some(sealed)))
    }

    /// Judges the logon: the SessionBaseKey when the account exists, may log on and the NTLMv2
    /// response proves its password; else the NTSTATUS a Windows server answers.
    fn logon(&self, auth: &Authenticate<'_>) -> Result<[u8; 16], u32> {
        // A UPN in UserName comes with an empty DomainName.
        let (name, upn_domain) = match auth.user.split_once('@') {
            Some((name, domain)) if auth.domain.is_empty() => (name, Some(domain)),
            _ => (auth.user.as_str(), None),
        };
        let (nb_computer, _) = self.computer_names();
        let account = self
            .spec
            .nla
            .accounts
            .iter()
            .find(|a| a.name.eq_ignore_ascii_case(name))
            .ok_or(STATUS_LOGON_FAILURE)?;
        // The domain is ignored unless the account names one; then it must be that one, the
        // sim's domain or this computer (a local account), or empty.
        if let Some(own) = &account.domain {
            let given = upn_domain.unwrap_or(&auth.domain);
            let known = [own.as_str(), NB_DOMAIN, DNS_DOMAIN, nb_computer.as_str(), "", "."];
            if !known.iter().any(|d| d.eq_ignore_ascii_case(given)) {
                return Err(STATUS_LOGON_FAILURE);
            }
        }
        // Like a domain controller: these states are told whatever the password.
        match account.state.as_str() {
            "disabled" => return Err(NTSTATUS_ACCOUNT_DISABLED),
            "locked" => return Err(NTSTATUS_ACCOUNT_LOCKED_OUT),
            "account_expired" => return Err(NTSTATUS_ACCOUNT_EXPIRED),
            _ => {}
        }
        let key = ntlm::ntowfv2(&account.password, &auth.user, &auth.domain);
        let base = ntlm::verify_ntlmv2(&key, &self.server_challenge, auth.nt_response).ok_or(STATUS_LOGON_FAILURE)?;
        // … and these only with the right password.
        match account.state.as_str() {
            "good" => Ok(base),
            "password_expired" => Err(NTSTATUS_PASSWORD_EXPIRED),
            "must_change" => Err(NTSTATUS_PASSWORD_MUST_CHANGE),
            "logon_hours" => Err(NTSTATUS_INVALID_LOGON_HOURS),
            "workstation" => Err(NTSTATUS_INVALID_WORKSTATION),
            "token_too_large" => Err(NTSTATUS_TOO_MANY_CONTEXT_IDS),
            _ => Err(STATUS_LOGON_FAILURE),
        }
    }
}

/// A minimal CredSSP client (raw NTLM, NTLMv2 with MIC and key exchange), written against the
/// same MS-NLMP helpers: the tests' client and the bench's direct baseline. Its client
/// challenge, exported session key and clientNonce are fixed: it exercises the targets, it
/// protects nothing.
pub(crate) mod client {
    use super::*;
    use crate::ntlm::flag;

    /// What the client asks for in its NEGOTIATE.
    pub(crate) const CLIENT_FLAGS: u32 = flag::UNICODE
        | flag::REQUEST_TARGET
        | flag::SIGN
        | flag::SEAL
        | flag::NTLM
        | flag::ALWAYS_SIGN
        | flag::EXTENDED_SESSIONSECURITY
        | flag::TARGET_INFO
        | flag::VERSION
        | flag::NEGOTIATE_128
        | flag::KEY_EXCH
        | flag::NEGOTIATE_56;

    /// A parsed CHALLENGE, as the client sees it.
    #[derive(Debug)]
    pub(crate) struct Challenge {
        pub(crate) flags: u32,
        pub(crate) server_challenge: [u8; 8],
        /// Read by the tests only.
        #[cfg_attr(not(test), allow(dead_code))]
        pub(crate) target_name: String,
        pub(crate) target_info: Vec<u8>,
        /// Read by the tests only.
        #[cfg_attr(not(test), allow(dead_code))]
        pub(crate) version: [u8; 8],
    }

    /// Parses a CHALLENGE_MESSAGE (MS-NLMP 2.2.1.2).
    pub(crate) fn parse_challenge(msg: &[u8]) -> Result<Challenge, String> {
        if msg.get(..8) != Some(&ntlm::SIGNATURE[..]) {
            return Err("not an NTLM message".to_owned());
        }
        let le16 = |at: usize| msg.get(at..at + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
        let le32 = |at: usize| {
            msg.get(at..at + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        if le32(8) != Some(ntlm::CHALLENGE) {
            return Err("not a CHALLENGE".to_owned());
        }
        let field = |at: usize, name: &str| -> Result<Vec<u8>, String> {
            let len = usize::from(le16(at).ok_or_else(|| format!("no {name}"))?);
            let off = le32(at + 4).ok_or_else(|| format!("no {name}"))? as usize;
            msg.get(off..off.saturating_add(len))
                .map(<[u8]>::to_vec)
                .ok_or_else(|| format!("{name} outside the message"))
        };
        let bytes8 = |at: usize, name: &str| -> Result<[u8; 8], String> {
            msg.get(at..at + 8)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| format!("no {name}"))
        };
        Ok(Challenge {
            flags: le32(20).ok_or("no NegotiateFlags")?,
            server_challenge: bytes8(24, "ServerChallenge")?,
            target_name: ntlm::from_utf16le(&field(12, "TargetName")?).ok_or("TargetName not UTF-16")?,
            target_info: field(40, "TargetInfo")?,
            version: bytes8(48, "Version")?,
        })
    }

    /// One client conversation: NEGOTIATE, AUTHENTICATE (+ pubKeyAuth), the server's
    /// pubKeyAuth checked, TSCredentials.
    pub(crate) struct Client {
        pub(crate) user: String,
        pub(crate) domain: String,
        pub(crate) password: String,
        /// TSRequest version the client sends.
        pub(crate) version: u32,
        /// Send MsvAvFlags with the MIC bit and a MIC.
        pub(crate) mic: bool,
        /// Send clientNonce (version 5+ clients do).
        pub(crate) send_nonce: bool,
        public_key: Vec<u8>,
        nonce: [u8; 32],
        negotiate: Vec<u8>,
        server_version: u32,
        security: Option<SessionSecurity>,
    }

    impl Client {
        /// A client logging on as `user` / `domain` with `password`, binding `public_key` (the
        /// server certificate's SubjectPublicKey, see [`subject_public_key`]).
        pub(crate) fn new(user: &str, domain: &str, password: &str, public_key: Vec<u8>) -> Self {
            Client {
                user: user.to_owned(),
                domain: domain.to_owned(),
                password: password.to_owned(),
                version: 6,
                mic: true,
                send_nonce: true,
                public_key,
                nonce: [0x11; 32],
                negotiate: Vec::new(),
                server_version: 0,
                security: None,
            }
        }

        /// TSRequest { version, negoTokens: NEGOTIATE }.
        pub(crate) fn negotiate(&mut self) -> Vec<u8> {
            let mut m = ntlm::SIGNATURE.to_vec();
            m.extend_from_slice(&ntlm::NEGOTIATE.to_le_bytes());
            m.extend_from_slice(&CLIENT_FLAGS.to_le_bytes());
            m.extend_from_slice(&[0; 16]); // DomainNameFields, WorkstationFields: empty
            m.extend_from_slice(&ntlm::version(10, 0, 19041));
            self.negotiate = m.clone();
            TsRequest {
                version: self.version,
                nego_tokens: vec![m],
                ..TsRequest::default()
            }
            .encode()
        }

        /// The CHALLENGE carried by the server's answer to the NEGOTIATE (and its bytes).
        pub(crate) fn challenge(&mut self, reply: &[u8]) -> Result<(Challenge, Vec<u8>), String> {
            let ts = TsRequest::decode(reply).map_err(|e| e.to_string())?;
            if let Some(code) = ts.error_code {
                return Err(format!("errorCode {code:#010x}"));
            }
            self.server_version = ts.version;
            let bytes = ts.nego_tokens.into_iter().next().ok_or("no negoToken")?;
            Ok((parse_challenge(&bytes)?, bytes))
        }

        /// From the server's CHALLENGE TSRequest, TSRequest { AUTHENTICATE, pubKeyAuth,
        /// clientNonce }.
        pub(crate) fn authenticate(&mut self, reply: &[u8]) -> Result<Vec<u8>, String> {
            let (challenge, challenge_bytes) = self.challenge(reply)?;
            let server_pairs = ntlm::parse_av_pairs(&challenge.target_info).map_err(|e| e.to_string())?;
            let timestamp = server_pairs
                .iter()
                .find(|(id, _)| *id == av::TIMESTAMP)
                .map_or(vec![0; 8], |(_, v)| v.to_vec());
            let mic_flags = ntlm::AV_FLAG_MIC.to_le_bytes();
            let mut pairs: Vec<(u16, &[u8])> = server_pairs.clone();
            if self.mic {
                pairs.push((av::FLAGS, &mic_flags[..]));
            }
            let client_challenge = [0x42u8; 8];
            let mut temp = vec![1, 1, 0, 0, 0, 0, 0, 0];
            temp.extend_from_slice(&timestamp);
            temp.extend_from_slice(&client_challenge);
            temp.extend_from_slice(&[0; 4]);
            temp.extend_from_slice(&ntlm::av_pairs(&pairs));
            temp.extend_from_slice(&[0; 4]);
            let key = ntlm::ntowfv2(&self.password, &self.user, &self.domain);
            let proof = ntlm::nt_proof_str(&key, &challenge.server_challenge, &temp);
            let mut nt = proof.to_vec();
            nt.extend_from_slice(&temp);
            let base = ntlm::hmac_md5(&key, &[&proof]);
            let exported = [0x5au8; 16];
            let encrypted_key = ntlm::rc4k(&base, &exported);
            let flags = challenge.flags & CLIENT_FLAGS;

            let header = if self.mic { 88 } else { 72 };
            let mut payload = Vec::new();
            let mut fields = Vec::new();
            for part in [
                ntlm::utf16le(&self.domain),
                ntlm::utf16le(&self.user),
                ntlm::utf16le("TESTCLIENT"),
                vec![0; 24],
                nt,
                encrypted_key,
            ] {
                let len = u16::try_from(part.len()).map_err(|_| "AUTHENTICATE field too long")?;
                fields.push((len, (header + payload.len()) as u32));
                payload.extend_from_slice(&part);
            }
            let field = |i: usize| {
                let (len, off) = fields[i];
                let mut f = len.to_le_bytes().to_vec();
                f.extend_from_slice(&len.to_le_bytes());
                f.extend_from_slice(&off.to_le_bytes());
                f
            };
            let mut m = ntlm::SIGNATURE.to_vec();
            m.extend_from_slice(&ntlm::AUTHENTICATE.to_le_bytes());
            for i in [3, 4, 0, 1, 2, 5] {
                m.extend(field(i)); // Lm, Nt, Domain, User, Workstation, EncryptedRandomSessionKey
            }
            m.extend_from_slice(&flags.to_le_bytes());
            m.extend_from_slice(&ntlm::version(10, 0, 19041));
            if self.mic {
                m.extend_from_slice(&[0; 16]);
            }
            m.extend_from_slice(&payload);
            if self.mic {
                let mic = ntlm::mic(&exported, &self.negotiate, &challenge_bytes, &m);
                m[ntlm::MIC_OFFSET..ntlm::MIC_OFFSET + 16].copy_from_slice(&mic);
            }
            let mut security = SessionSecurity::new(&exported, flags, Side::Client);
            let version = self.version.min(self.server_version);
            let pub_key_auth = security.seal(&client_binding(version, &self.nonce, &self.public_key));
            self.security = Some(security);
            Ok(TsRequest {
                version: self.version,
                nego_tokens: vec![m],
                pub_key_auth: Some(pub_key_auth),
                client_nonce: (self.version >= 5 && self.send_nonce).then(|| self.nonce.to_vec()),
                ..TsRequest::default()
            }
            .encode())
        }

        /// Checks the server's answer to the AUTHENTICATE: its errorCode, or that its pubKeyAuth
        /// binds the server's key.
        pub(crate) fn finish(&mut self, reply: &[u8]) -> Result<(), String> {
            let ts = TsRequest::decode(reply).map_err(|e| e.to_string())?;
            if let Some(code) = ts.error_code {
                return Err(format!("errorCode {code:#010x}"));
            }
            let sealed = ts.pub_key_auth.ok_or("no pubKeyAuth")?;
            let security = self.security.as_mut().ok_or("no session")?;
            let got = security.unseal(&sealed).map_err(|e| e.to_string())?;
            let version = self.version.min(self.server_version);
            if got == server_binding(version, &self.nonce, &self.public_key) {
                Ok(())
            } else {
                Err("server pubKeyAuth does not bind the key".to_owned())
            }
        }

        /// A sealed TSCredentials-like blob (never judged by the server).
        #[cfg(test)]
        pub(crate) fn credentials(&mut self) -> Result<Vec<u8>, String> {
            let security = self.security.as_mut().ok_or("no session")?;
            Ok(TsRequest {
                version: self.version,
                auth_info: Some(security.seal(b"not really TSCredentials")),
                ..TsRequest::default()
            }
            .encode())
        }
    }
}

/// The tests' view of [`client`]: the same client, panicking on malformed answers.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod test_client {
    pub(crate) use super::client::{Challenge, Client, CLIENT_FLAGS};

    pub(crate) fn parse_challenge(msg: &[u8]) -> Challenge {
        super::client::parse_challenge(msg).unwrap()
    }

    /// [`Client`] with infallible steps.
    pub(crate) struct TestClient(Client);

    impl std::ops::Deref for TestClient {
        type Target = Client;
        fn deref(&self) -> &Client {
            &self.0
        }
    }

    impl std::ops::DerefMut for TestClient {
        fn deref_mut(&mut self) -> &mut Client {
            &mut self.0
        }
    }

    impl TestClient {
        pub(crate) fn new(user: &str, domain: &str, password: &str, public_key: Vec<u8>) -> Self {
            TestClient(Client::new(user, domain, password, public_key))
        }

        pub(crate) fn negotiate(&mut self) -> Vec<u8> {
            self.0.negotiate()
        }

        pub(crate) fn authenticate(&mut self, reply: &[u8]) -> Vec<u8> {
            self.0.authenticate(reply).unwrap()
        }

        pub(crate) fn finish(&mut self, reply: &[u8]) -> Result<(), String> {
            self.0.finish(reply)
        }

        pub(crate) fn credentials(&mut self) -> Vec<u8> {
            self.0.credentials().unwrap()
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::{test_client::*, *};
    use crate::scenario::{Account, NlaSpec};

    const PUBLIC_KEY: &[u8] = &[0x04, 0xaa, 0xbb, 0xcc, 0xdd];

    fn account(name: &str, password: &str, state: &str) -> Account {
        Account {
            name: name.to_owned(),
            password: password.to_owned(),
            state: state.to_owned(),
            domain: None,
        }
    }

    fn target(behavior: Behavior) -> TargetSpec {
        let mut t = TargetSpec::new("nla-test", behavior);
        t.nla.accounts = vec![
            account("nina", "Nla-Pass-1", "good"),
            account("lou", "Locked-Pass-5", "locked"),
            account("pat", "Expired-Pass-6", "password_expired"),
            Account {
                domain: Some("OTHERDOM".to_owned()),
                ..account("otto", "Other-Pass-7", "good")
            },
        ];
        t
    }

    const NOW_NANOS: i128 = 1_700_000_000_000_000_000;

    /// Plays a whole conversation; returns the client's verdict on the server's last answer
    /// (None if the server closed).
    fn converse(spec: &TargetSpec, client: &mut TestClient) -> Option<Result<(), String>> {
        let mut server = CredSspServer::new(spec, PUBLIC_KEY.to_vec(), [1, 2, 3, 4, 5, 6, 7, 8], NOW_NANOS);
        let Reply::Continue(challenge) = server.handle(&client.negotiate()) else {
            panic!("no CHALLENGE");
        };
        match server.handle(&client.authenticate(&challenge)) {
            Reply::Authenticated(answer) => {
                let verdict = client.finish(&answer);
                assert!(server.awaiting_credentials());
                assert_eq!(server.handle(&client.credentials()), Reply::Close);
                Some(verdict)
            }
            Reply::Refuse(answer) => Some(client.finish(&answer)),
            Reply::Continue(_) => panic!("unexpected Continue"),
            Reply::Close => None,
        }
    }

    #[test]
    fn healthy_logs_on_with_the_right_password_only() {
        let spec = target(Behavior::NlaHealthy);
        let ok = converse(
            &spec,
            &mut TestClient::new("nina", "", "Nla-Pass-1", PUBLIC_KEY.to_vec()),
        );
        assert_eq!(ok, Some(Ok(())));
        // The user name is case-insensitive; the domain is free when the account names none.
        let ok = converse(
            &spec,
            &mut TestClient::new("NINA", "WHATEVER", "Nla-Pass-1", PUBLIC_KEY.to_vec()),
        );
        assert_eq!(ok, Some(Ok(())));
        let ok = converse(
            &spec,
            &mut TestClient::new("nina@simdom.test", "", "Nla-Pass-1", PUBLIC_KEY.to_vec()),
        );
        assert_eq!(ok, Some(Ok(())));
        let refused = Some(Err("errorCode 0xc000006d".to_owned()));
        assert_eq!(
            converse(&spec, &mut TestClient::new("nina", "", "wrong", PUBLIC_KEY.to_vec())),
            refused
        );
        assert_eq!(
            converse(
                &spec,
                &mut TestClient::new("nobody", "", "Nla-Pass-1", PUBLIC_KEY.to_vec())
            ),
            refused
        );
        // An account with a domain needs that domain (or the sim's, or none).
        assert_eq!(
            converse(
                &spec,
                &mut TestClient::new("otto", "OTHERDOM", "Other-Pass-7", PUBLIC_KEY.to_vec())
            ),
            Some(Ok(()))
        );
        assert_eq!(
            converse(
                &spec,
                &mut TestClient::new("otto", "SIMDOM", "Other-Pass-7", PUBLIC_KEY.to_vec())
            ),
            Some(Ok(()))
        );
        assert_eq!(
            converse(
                &spec,
                &mut TestClient::new("otto", "ELSEWHERE", "Other-Pass-7", PUBLIC_KEY.to_vec())
            ),
            refused
        );
        // Account states, like a domain controller.
        assert_eq!(
            converse(&spec, &mut TestClient::new("lou", "", "wrong", PUBLIC_KEY.to_vec())),
            Some(Err("errorCode 0xc0000234".to_owned()))
        );
        assert_eq!(
            converse(
                &spec,
                &mut TestClient::new("pat", "", "Expired-Pass-6", PUBLIC_KEY.to_vec())
            ),
            Some(Err("errorCode 0xc0000071".to_owned()))
        );
        assert_eq!(
            converse(&spec, &mut TestClient::new("pat", "", "wrong", PUBLIC_KEY.to_vec())),
            refused
        );
    }

    #[test]
    fn close_after_authenticate_closes_instead_of_error_code() {
        let mut spec = target(Behavior::NlaHealthy);
        spec.nla.close_after_authenticate = true;
        assert_eq!(
            converse(&spec, &mut TestClient::new("nina", "", "wrong", PUBLIC_KEY.to_vec())),
            None
        );
        assert_eq!(
            converse(
                &spec,
                &mut TestClient::new("nina", "", "Nla-Pass-1", PUBLIC_KEY.to_vec())
            ),
            Some(Ok(()))
        );
    }

    #[test]
    fn versions_and_binding_forms() {
        // A version 2-4 server and any client: the key itself, plus one on the way back.
        let old = target(Behavior::NlaOld);
        let mut client = TestClient::new("nina", "", "Nla-Pass-1", PUBLIC_KEY.to_vec());
        assert_eq!(converse(&old, &mut client), Some(Ok(())));
        let mut client = TestClient::new("nina", "", "Nla-Pass-1", PUBLIC_KEY.to_vec());
        client.version = 3;
        assert_eq!(converse(&old, &mut client), Some(Ok(())));
        // A version 6 server and a version 4 client: the old form too.
        let healthy = target(Behavior::NlaHealthy);
        assert_eq!(converse(&healthy, &mut client), Some(Ok(())));
        // Version 5+ without a clientNonce is a protocol fault.
        let mut client = TestClient::new("nina", "", "Nla-Pass-1", PUBLIC_KEY.to_vec());
        client.send_nonce = false;
        assert_eq!(
            converse(&healthy, &mut client),
            Some(Err("errorCode 0x80090308".to_owned()))
        );
        // Without a MIC, fine.
        let mut client = TestClient::new("nina", "", "Nla-Pass-1", PUBLIC_KEY.to_vec());
        client.mic = false;
        assert_eq!(converse(&healthy, &mut client), Some(Ok(())));
        // A client bound to another key (a man in the middle) is refused.
        let mut client = TestClient::new("nina", "", "Nla-Pass-1", vec![0x04, 1, 2, 3]);
        assert_eq!(
            converse(&healthy, &mut client),
            Some(Err("errorCode 0x80090308".to_owned()))
        );

        assert_eq!(server_binding(4, &[], &[0x30, 0x82]), vec![0x31, 0x82]);
        assert_eq!(server_binding(2, &[], &[0xff, 0x01]), vec![0x00, 0x02]);
        assert_eq!(client_binding(4, &[9; 32], &[0x30]), vec![0x30]);
        assert_eq!(client_binding(5, &[9; 32], &[0x30]).len(), 32);
        assert_ne!(
            client_binding(6, &[9; 32], &[0x30]),
            server_binding(6, &[9; 32], &[0x30])
        );
    }

    #[test]
    fn error_and_close_behaviours() {
        let mut spec = target(Behavior::NlaError);
        assert_eq!(
            converse(
                &spec,
                &mut TestClient::new("nina", "", "Nla-Pass-1", PUBLIC_KEY.to_vec())
            ),
            Some(Err("errorCode 0xc000006d".to_owned()))
        );
        spec.nla.ntstatus = 0xC000_015B;
        assert_eq!(
            converse(&spec, &mut TestClient::new("nina", "", "whatever", PUBLIC_KEY.to_vec())),
            Some(Err("errorCode 0xc000015b".to_owned()))
        );
        let spec = target(Behavior::NlaClose);
        assert_eq!(
            converse(
                &spec,
                &mut TestClient::new("nina", "", "Nla-Pass-1", PUBLIC_KEY.to_vec())
            ),
            None
        );
    }

    #[test]
    fn challenge_names_the_computer_and_the_clock() {
        for (behavior, computer, skew) in [
            (Behavior::NlaHealthy, "NLA-TEST", 0i64),
            (Behavior::NlaOtherComputer, "INTRUDER01", 0),
            (Behavior::NlaSkewed, "NLA-TEST", 900),
        ] {
            let spec = target(behavior);
            let mut server = CredSspServer::new(&spec, PUBLIC_KEY.to_vec(), [7; 8], NOW_NANOS);
            let mut client = TestClient::new("nina", "", "x", PUBLIC_KEY.to_vec());
            let Reply::Continue(answer) = server.handle(&client.negotiate()) else {
                panic!("no CHALLENGE");
            };
            let ts = TsRequest::decode(&answer).unwrap();
            assert_eq!(ts.version, 6);
            assert_eq!(ts.nego_tokens.len(), 1);
            let c = parse_challenge(&ts.nego_tokens[0]);
            assert_eq!(c.server_challenge, [7; 8]);
            assert_eq!(c.target_name, "SIMDOM");
            assert_eq!(c.version, [10, 0, 0x63, 0x45, 0, 0, 0, 0x0f]);
            assert_eq!(c.flags & CLIENT_FLAGS, CLIENT_FLAGS, "{:#x}", c.flags);
            assert_ne!(c.flags & ntlm::flag::TARGET_TYPE_DOMAIN, 0);
            let pairs = ntlm::parse_av_pairs(&c.target_info).unwrap();
            let text = |id: u16| ntlm::from_utf16le(pairs.iter().find(|(i, _)| *i == id).unwrap().1).unwrap();
            assert_eq!(text(av::NB_DOMAIN_NAME), "SIMDOM");
            assert_eq!(text(av::NB_COMPUTER_NAME), computer);
            assert_eq!(text(av::DNS_DOMAIN_NAME), "simdom.test");
            assert_eq!(
                text(av::DNS_COMPUTER_NAME),
                format!("{}.simdom.test", computer.to_lowercase())
            );
            let ids: Vec<u16> = pairs.iter().map(|(i, _)| *i).collect();
            assert_eq!(ids, [2, 1, 4, 3, 5, 7]);
            let time = pairs.iter().find(|(i, _)| *i == av::TIMESTAMP).unwrap().1;
            let time = u64::from_le_bytes(time.try_into().unwrap());
            let expected = (NOW_NANOS / 100) as u64 + 116_444_736_000_000_000 + skew as u64 * 10_000_000;
            assert_eq!(time, expected);
        }
        let mut old = target(Behavior::NlaOld);
        old.nla.computer = "RDP-SIM01".to_owned();
        let mut server = CredSspServer::new(&old, PUBLIC_KEY.to_vec(), [7; 8], NOW_NANOS);
        let Reply::Continue(answer) = server.handle(&TestClient::new("a", "", "b", vec![]).negotiate()) else {
            panic!("no CHALLENGE");
        };
        assert_eq!(TsRequest::decode(&answer).unwrap().version, 4);
    }

    #[test]
    fn the_server_tolerates_nothing_odd() {
        let spec = target(Behavior::NlaHealthy);
        let fresh = || CredSspServer::new(&spec, PUBLIC_KEY.to_vec(), [7; 8], NOW_NANOS);
        // Garbage, a SPNEGO token, a TSRequest without tokens, a client errorCode: closed.
        assert_eq!(fresh().handle(b"\x30\x03\x02\x01"), Reply::Close);
        let spnego = TsRequest {
            version: 6,
            nego_tokens: vec![vec![0x60, 0x28, 0x06, 0x06, 0x2b, 0x06, 0x01, 0x05, 0x05, 0x02]],
            ..TsRequest::default()
        };
        assert_eq!(fresh().handle(&spnego.encode()), Reply::Close);
        let empty = TsRequest {
            version: 6,
            ..TsRequest::default()
        };
        assert_eq!(fresh().handle(&empty.encode()), Reply::Close);
        // An AUTHENTICATE that is not one: SEC_E_INVALID_TOKEN.
        let mut server = fresh();
        let mut client = TestClient::new("nina", "", "Nla-Pass-1", PUBLIC_KEY.to_vec());
        assert!(matches!(server.handle(&client.negotiate()), Reply::Continue(_)));
        let bogus = TsRequest {
            version: 6,
            nego_tokens: vec![b"NTLMSSP\0\x03\0\0\0".to_vec()],
            ..TsRequest::default()
        };
        let Reply::Refuse(answer) = server.handle(&bogus.encode()) else {
            panic!("not refused");
        };
        assert_eq!(
            TsRequest::decode(&answer).unwrap().error_code,
            Some(SEC_E_INVALID_TOKEN)
        );
        assert_eq!(server.handle(&bogus.encode()), Reply::Close, "conversation over");
        // A tampered MIC.
        let mut server = fresh();
        let Reply::Continue(challenge) = server.handle(&client.negotiate()) else {
            panic!()
        };
        let mut ts = TsRequest::decode(&client.authenticate(&challenge)).unwrap();
        ts.nego_tokens[0][ntlm::MIC_OFFSET] ^= 1;
        let Reply::Refuse(answer) = server.handle(&ts.encode()) else {
            panic!("tampered MIC accepted");
        };
        assert_eq!(
            TsRequest::decode(&answer).unwrap().error_code,
            Some(SEC_E_INVALID_TOKEN)
        );
        // Random bytes through every state never panic.
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        for _ in 0..2000 {
            let mut server = fresh();
            let mut client = TestClient::new("nina", "", "Nla-Pass-1", PUBLIC_KEY.to_vec());
            let first = client.negotiate();
            let input = if rng.next().is_multiple_of(2) {
                first
            } else {
                rng.mutate(&first)
            };
            if let Reply::Continue(challenge) = server.handle(&input) {
                let auth = client.authenticate(&challenge);
                let _ = server.handle(&rng.mutate(&auth));
            }
        }
    }

    /// A tiny deterministic PRNG for mutation tests.
    pub(super) struct XorShift(pub(super) u64);

    impl XorShift {
        pub(super) fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        /// Flips, truncates, extends or overwrites a few bytes.
        pub(super) fn mutate(&mut self, input: &[u8]) -> Vec<u8> {
            let mut out = input.to_vec();
            for _ in 0..1 + self.next() % 4 {
                let at = (self.next() as usize) % out.len().max(1);
                match self.next() % 5 {
                    0 if !out.is_empty() => out[at] ^= 1 << (self.next() % 8),
                    1 => out.truncate(at),
                    2 => out.extend((0..self.next() % 8).map(|_| self.next() as u8)),
                    3 if !out.is_empty() => out[at] = [0x00, 0x7f, 0x80, 0x84, 0xff][(self.next() % 5) as usize],
                    _ if !out.is_empty() => out[at] = self.next() as u8,
                    _ => {}
                }
            }
            out
        }
    }

    #[test]
    fn ts_request_round_trips() {
        let full = TsRequest {
            version: 6,
            nego_tokens: vec![vec![1, 2, 3], vec![0xaa; 300]],
            auth_info: Some(vec![4; 5]),
            pub_key_auth: Some(vec![5; 200]),
            error_code: Some(0xC000_006D),
            client_nonce: Some(vec![6; 32]),
        };
        for r in [
            full.clone(),
            TsRequest {
                version: 2,
                ..TsRequest::default()
            },
            TsRequest {
                version: 0x80,
                error_code: Some(5),
                ..TsRequest::default()
            },
            TsRequest {
                version: 3,
                nego_tokens: vec![vec![0; 70_000 / 2]],
                ..TsRequest::default()
            },
        ] {
            assert_eq!(TsRequest::decode(&r.encode()).unwrap(), r);
        }
        // errorCode is encoded like Windows, as a signed 32-bit INTEGER …
        let e = TsRequest {
            version: 6,
            error_code: Some(0xC000_006D),
            ..TsRequest::default()
        }
        .encode();
        assert_eq!(
            e,
            [0x30, 0x0d, 0xa0, 0x03, 0x02, 0x01, 0x06, 0xa4, 0x06, 0x02, 0x04, 0xc0, 0x00, 0x00, 0x6d]
        );
        // … and also read when encoded unsigned (5 octets).
        let unsigned = [
            0x30, 0x0e, 0xa0, 0x03, 0x02, 0x01, 0x06, 0xa4, 0x07, 0x02, 0x05, 0x00, 0xc0, 0x00, 0x00, 0x6d,
        ];
        assert_eq!(TsRequest::decode(&unsigned).unwrap().error_code, Some(0xC000_006D));
        // A hand-laid TSRequest { version 6, negoTokens [ "ab" ] } with long-form lengths.
        let hand = [
            0x30, 0x81, 0x13, // SEQUENCE, length 19 in long form
            0xa0, 0x03, 0x02, 0x01, 0x06, // [0] INTEGER 6
            0xa1, 0x0c, 0x30, 0x0a, 0x30, 0x08, 0xa0, 0x06, 0x04, 0x82, 0x00, 0x02, b'a', b'b', // [1] NegoData
        ];
        let d = TsRequest::decode(&hand).unwrap();
        assert_eq!((d.version, d.nego_tokens), (6, vec![b"ab".to_vec()]));
        assert_eq!(frame_length(&hand[..2]), Ok(None));
        assert_eq!(frame_length(&hand[..3]), Ok(Some(hand.len())));
        assert_eq!(frame_length(&full.encode()[..4]), Ok(Some(full.encode().len())));
    }

    #[test]
    fn hostile_der_is_rejected_without_panic() {
        let cases: &[&[u8]] = &[
            b"",
            &[0x30],
            &[0x30, 0x80, 0x00, 0x00],                         // indefinite length
            &[0x30, 0x85, 1, 0, 0, 0, 0],                      // 5 length octets
            &[0x30, 0x84, 0xff, 0xff, 0xff, 0xff],             // 4 GiB
            &[0x30, 0x05, 0xa0, 0x03, 0x02, 0x01],             // truncated inside
            &[0x30, 0x03, 0xa0, 0x01, 0x02],                   // inner length past the end
            &[0x30, 0x05, 0xa0, 0x03, 0x02, 0x01, 0x06, 0x00], // trailing byte
            &[0x30, 0x04, 0xa0, 0x02, 0x02, 0x00],             // empty INTEGER
            &[0x30, 0x05, 0xa0, 0x03, 0x02, 0x01, 0xff],       // negative version
            &[0x30, 0x05, 0xa1, 0x03, 0x02, 0x01, 0x06],       // no version
            &[0x30, 0x0a, 0xa0, 0x03, 0x02, 0x01, 0x06, 0xa6, 0x03, 0x02, 0x01, 0x00], // unknown [6]
            &[
                0x30, 0x0d, 0xa0, 0x03, 0x02, 0x01, 0x06, 0xa3, 0x02, 0x04, 0x00, 0xa2, 0x02, 0x04, 0x00,
            ], // out of order
            &[0x30, 0x07, 0xa0, 0x05, 0x1f, 0x81, 0x01, 0x01, 0x06], // high tag number
            &[0x04, 0x01, 0x00],                               // not a SEQUENCE
        ];
        for (i, bytes) in cases.iter().enumerate() {
            assert!(TsRequest::decode(bytes).is_err(), "case {i} decoded");
        }
        assert_eq!(
            frame_length(&[0x04, 0x01]),
            Err(DerError::Tag { got: 0x04, want: 0x30 })
        );
        assert_eq!(frame_length(&[0x30, 0x80]), Err(DerError::Form));
        assert_eq!(
            frame_length(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]),
            Err(DerError::TooLarge(0xffff_ffff + 6))
        );
        assert!(TsRequest::decode(&vec![0x30; MAX_TS_REQUEST + 1]).is_err());
        // Deep nesting is not recursion: a thousand nested SEQUENCEs only fail.
        let mut nested = vec![0x05, 0x00];
        for _ in 0..1000 {
            nested = tlv(SEQUENCE, &nested);
        }
        assert!(TsRequest::decode(&nested).is_err());
        // Every truncation and many random mutations of a full TSRequest.
        let full = TsRequest {
            version: 6,
            nego_tokens: vec![vec![1; 40], vec![2; 3]],
            auth_info: Some(vec![3; 4]),
            pub_key_auth: Some(vec![4; 150]),
            error_code: Some(0x8009_0308),
            client_nonce: Some(vec![5; 32]),
        }
        .encode();
        for cut in 0..full.len() {
            assert!(TsRequest::decode(&full[..cut]).is_err(), "cut {cut}");
            let _ = frame_length(&full[..cut.min(6)]);
        }
        let mut rng = XorShift(42);
        for _ in 0..20_000 {
            let m = rng.mutate(&full);
            if let Ok(r) = TsRequest::decode(&m) {
                // Whatever decodes re-encodes to something that decodes the same.
                assert_eq!(TsRequest::decode(&r.encode()).unwrap(), r);
            }
            let _ = subject_public_key(&m);
        }
    }

    #[test]
    fn nla_spec_defaults() {
        let s = NlaSpec::new("a-very-long-target-name.example", Behavior::NlaHealthy);
        assert_eq!(s.computer, "A-VERY-LONG-TAR");
        assert_eq!((s.credssp_version, s.skew_secs), (6, 0));
        assert_eq!(NlaSpec::new("x", Behavior::NlaOld).credssp_version, 4);
        assert_eq!(NlaSpec::new("x", Behavior::NlaSkewed).skew_secs, 900);
        assert_eq!(NlaSpec::new("x", Behavior::NlaOtherComputer).computer, "INTRUDER01");
    }
}
