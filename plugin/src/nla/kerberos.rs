//! CredSSP with Kerberos inside SPNEGO, sans I/O: the NLA logon that spends no password
//! attempt (MS-CSSP 3.1.5 over RFC 4178 and RFC 4121, as MS-KILE profiles them).
//!
//! 1. TSRequest { negoTokens: SPNEGO NegTokenInit { mechTypes [MS-KRB5, KRB5], mechToken:
//!    AP-REQ } }. Only Kerberos is offered: a server cannot pick NTLM from this list, so there
//!    is no silent fallback.
//! 2. The server's NegTokenResp carries the AP-REP (mutual authentication: it decrypts with the
//!    service session key and echoes our authenticator's time, which only the holder of the
//!    service's key can do), or a KRB-ERROR, or the TSRequest has an errorCode.
//! 3. TSRequest { pubKeyAuth: GSS Wrap of the binding hash of the server's TLS key (version 5+)
//!    or of the key itself, clientNonce, and our mechListMIC when the server sent one }.
//! 4. The server's pubKeyAuth, unwrapped and compared. TSCredentials is never sent.
//!
//! Wrap tokens follow RFC 4121 4.2.6.2 with confidentiality, EC 0 and RRC 28 (what Windows
//! sends in CredSSP); received tokens are rotated back by whatever RRC + EC they carry. The
//! context key is the acceptor's subkey when the AP-REP has one, else ours.

use std::sync::Arc;

use zeroize::Zeroizing;

use super::{
    credssp::{binding_hash, increment_le, CLIENT_SERVER_MAGIC, CLIENT_VERSION, SERVER_CLIENT_MAGIC},
    tsrequest::{self, tlv, DecodeError, TsRequest},
};
use crate::kerberos::messages::{self, der, AsAnswer, KdcError, ServiceTicket, UnixSecs};

/// 1.3.6.1.5.5.2
pub const OID_SPNEGO: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x02];
/// 1.2.840.113554.1.2.2
pub const OID_KRB5: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x12, 0x01, 0x02, 0x02];
/// 1.2.840.48018.1.2.2 (the OID Windows puts first)
pub const OID_MS_KRB5: &[u8] = &[0x2a, 0x86, 0x48, 0x82, 0xf7, 0x12, 0x01, 0x02, 0x02];
/// 1.3.6.1.4.1.311.2.2.10 (NTLM, only to name it when a server picks it)
pub const OID_NTLM: &[u8] = &[0x2b, 0x06, 0x01, 0x04, 0x01, 0x82, 0x37, 0x02, 0x02, 0x0a];

/// RFC 4121 key usages.
const ACCEPTOR_SEAL: i32 = 22;
const ACCEPTOR_SIGN: i32 = 23;
const INITIATOR_SEAL: i32 = 24;
const INITIATOR_SIGN: i32 = 25;
/// Token flags: SentByAcceptor, Sealed, AcceptorSubkey.
const SENT_BY_ACCEPTOR: u8 = 0x01;
const SEALED: u8 = 0x02;
const ACCEPTOR_SUBKEY: u8 = 0x04;
/// Right rotation count of the Wrap tokens we send.
pub const RRC: u16 = 28;

/// The random values one Kerberos logon uses.
pub struct KrbEntropy {
    /// Our subkey material (truncated to the etype's key size).
    pub subkey: Zeroizing<[u8; 32]>,
    /// Our initial sequence number (31 bits).
    pub seq: u32,
    /// clientNonce.
    pub nonce: [u8; 32],
}

impl KrbEntropy {
    /// Filled by `fill` (the caller's random source).
    pub fn from_fn(mut fill: impl FnMut(&mut [u8])) -> Self {
        let mut e = KrbEntropy {
            subkey: Zeroizing::new([0; 32]),
            seq: 0,
            nonce: [0; 32],
        };
        fill(&mut e.subkey[..]);
        let mut s = [0u8; 4];
        fill(&mut s);
        e.seq = u32::from_be_bytes(s) & 0x3FFF_FFFF;
        fill(&mut e.nonce);
        e
    }
}

/// Why the Kerberos logon stopped short of an accepted one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KrbRefusal {
    /// Not a TSRequest.
    NotTsRequest(DecodeError),
    /// The server answered an errorCode, maybe beside a KRB-ERROR token.
    ErrorCode {
        /// The server's TSRequest version.
        version: u32,
        /// The NTSTATUS.
        status: u32,
        /// The KRB-ERROR in its negoToken, if any.
        krb: Option<KdcError>,
    },
    /// A KRB-ERROR in the server's SPNEGO answer (no errorCode).
    KrbError(KdcError),
    /// The server's SPNEGO answer rejects Kerberos (negState reject) without saying more, or
    /// names another mechanism (`mech`).
    Rejected {
        /// The mechanism the server named instead, if any.
        mech: Option<&'static str>,
    },
    /// A token that is not the SPNEGO / GSS / Kerberos message expected.
    Malformed(String),
    /// The AP-REP does not prove the server holds the service's key.
    MutualAuth(String),
    /// The answer has neither pubKeyAuth nor errorCode.
    NoPubKeyAuth,
    /// The server's pubKeyAuth does not unwrap or does not match our view of its TLS key.
    PubKeyAuthMismatch(&'static str),
    /// Our own side failed (encoder, crypto library, a call out of order).
    Internal(String),
}

impl std::fmt::Display for KrbRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KrbRefusal::NotTsRequest(e) => write!(f, "{e}"),
            KrbRefusal::ErrorCode { status, krb, .. } => match krb {
                Some(k) => write!(f, "errorCode 0x{status:08X}, KRB-ERROR {}", k.code),
                None => write!(f, "errorCode 0x{status:08X}"),
            },
            KrbRefusal::KrbError(k) => write!(f, "KRB-ERROR {} ({})", k.code, krb_error_name(k.code)),
            KrbRefusal::Rejected { mech: Some(m) } => write!(f, "the server chose {m}, not Kerberos"),
            KrbRefusal::Rejected { mech: None } => f.write_str("the server rejected Kerberos (negState reject)"),
            KrbRefusal::Malformed(e) => write!(f, "{e}"),
            KrbRefusal::MutualAuth(e) => write!(f, "mutual authentication failed: {e}"),
            KrbRefusal::NoPubKeyAuth => f.write_str("answer without pubKeyAuth or errorCode"),
            KrbRefusal::PubKeyAuthMismatch(why) => write!(f, "server pubKeyAuth {why}"),
            KrbRefusal::Internal(e) => write!(f, "internal: {e}"),
        }
    }
}

/// The RFC 4120 name of a KRB-ERROR code an application server may answer.
pub fn krb_error_name(code: u32) -> &'static str {
    match code {
        31 => "KRB_AP_ERR_BAD_INTEGRITY",
        32 => "KRB_AP_ERR_TKT_EXPIRED",
        33 => "KRB_AP_ERR_TKT_NYV",
        34 => "KRB_AP_ERR_REPEAT",
        35 => "KRB_AP_ERR_NOT_US",
        36 => "KRB_AP_ERR_BADMATCH",
        37 => "KRB_AP_ERR_SKEW",
        41 => "KRB_AP_ERR_MODIFIED",
        44 => "KRB_AP_ERR_BADKEYVER",
        45 => "KRB_AP_ERR_NOKEY",
        60 => "KRB_ERR_GENERIC",
        _ => "",
    }
}

// ------------------------------------------------------------------ SPNEGO and GSS framing

/// The mechTypes we offer, DER (what mechListMIC covers).
pub fn mech_types() -> Vec<u8> {
    let mut oids = tlv(0x06, OID_MS_KRB5);
    oids.extend_from_slice(&tlv(0x06, OID_KRB5));
    tlv(0x30, &oids)
}

/// A GSS initial-context token (RFC 2743 3.1): [APPLICATION 0] { OID, body }.
pub fn gss_token(oid: &[u8], body: &[u8]) -> Vec<u8> {
    let mut inner = tlv(0x06, oid);
    inner.extend_from_slice(body);
    tlv(0x60, &inner)
}

/// A Kerberos GSS token: the krb5 OID, the two-byte TOK_ID, the message.
pub fn krb5_token(tok_id: [u8; 2], msg: &[u8]) -> Vec<u8> {
    let mut body = tok_id.to_vec();
    body.extend_from_slice(msg);
    gss_token(OID_KRB5, &body)
}

/// SPNEGO NegTokenInit carrying `mech_token`, GSS-framed.
pub fn neg_token_init(mech_token: &[u8]) -> Vec<u8> {
    let mut seq = tlv(0xa0, &mech_types());
    seq.extend_from_slice(&tlv(0xa2, &tlv(0x04, mech_token)));
    gss_token(OID_SPNEGO, &tlv(0xa0, &tlv(0x30, &seq)))
}

/// SPNEGO NegTokenResp with only a mechListMIC (the initiator's last token).
pub fn neg_token_resp_mic(mic: &[u8]) -> Vec<u8> {
    tlv(0xa1, &tlv(0x30, &tlv(0xa3, &tlv(0x04, mic))))
}

/// A NegTokenResp as read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NegTokenResp {
    /// 0 accept-completed, 1 accept-incomplete, 2 reject, 3 request-mic.
    pub neg_state: Option<u8>,
    /// The supportedMech OID contents.
    pub supported_mech: Option<Vec<u8>>,
    /// responseToken.
    pub response_token: Option<Vec<u8>>,
    /// mechListMIC.
    pub mech_list_mic: Option<Vec<u8>>,
}

fn malformed(what: &str) -> KrbRefusal {
    KrbRefusal::Malformed(format!("SPNEGO answer: {what}"))
}

/// Reads a NegTokenResp ([1] SEQUENCE { [0] ENUMERATED, [1] OID, [2] OCTET STRING, [3] OCTET
/// STRING }).
pub fn read_neg_token_resp(b: &[u8]) -> Result<NegTokenResp, KrbRefusal> {
    let (tag, body, _) = der(b).ok_or_else(|| malformed("not DER"))?;
    if tag != 0xa1 {
        return Err(malformed(&format!("tag 0x{tag:02x}, not NegTokenResp")));
    }
    let (tag, mut fields, _) = der(body).ok_or_else(|| malformed("NegTokenResp body"))?;
    if tag != 0x30 {
        return Err(malformed("NegTokenResp is not a SEQUENCE"));
    }
    let mut out = NegTokenResp::default();
    while !fields.is_empty() {
        let (tag, v, rest) = der(fields).ok_or_else(|| malformed("NegTokenResp field"))?;
        fields = rest;
        let (itag, inner, _) = der(v).ok_or_else(|| malformed("NegTokenResp field contents"))?;
        match (tag, itag) {
            (0xa0, 0x0a) if inner.len() == 1 => out.neg_state = Some(inner[0]),
            (0xa1, 0x06) => out.supported_mech = Some(inner.to_vec()),
            (0xa2, 0x04) => out.response_token = Some(inner.to_vec()),
            (0xa3, 0x04) => out.mech_list_mic = Some(inner.to_vec()),
            _ => return Err(malformed(&format!("unexpected field 0x{tag:02x}/0x{itag:02x}"))),
        }
    }
    Ok(out)
}

/// Reads a Kerberos GSS token: (TOK_ID, message). Accepts the token with or without the
/// [APPLICATION 0] framing (acceptors send both).
pub fn read_krb5_token(b: &[u8]) -> Result<([u8; 2], &[u8]), KrbRefusal> {
    let bad = || KrbRefusal::Malformed("the responseToken is not a Kerberos GSS token".into());
    let body = match der(b) {
        Some((0x60, body, _)) => {
            let (tag, oid, rest) = der(body).ok_or_else(bad)?;
            if tag != 0x06 || (oid != OID_KRB5 && oid != OID_MS_KRB5) {
                return Err(bad());
            }
            rest
        }
        _ => b,
    };
    match body {
        [a, b, msg @ ..] => Ok(([*a, *b], msg)),
        _ => Err(bad()),
    }
}

fn mech_name(oid: &[u8]) -> &'static str {
    match oid {
        o if o == OID_NTLM => "NTLM",
        o if o == OID_KRB5 || o == OID_MS_KRB5 => "Kerberos",
        _ => "another mechanism",
    }
}

// ------------------------------------------------------------------ RFC 4121 tokens

fn cipher(etype: u8) -> Result<Box<dyn picky_krb::crypto::Cipher>, String> {
    messages::suite(etype)
        .map(|s| s.cipher())
        .ok_or_else(|| format!("etype {etype} not supported"))
}

fn checksum(etype: u8, key: &[u8], usage: i32, data: &[u8]) -> Result<Vec<u8>, String> {
    use picky_krb::crypto::ChecksumSuite;
    let suite = match etype {
        18 => ChecksumSuite::HmacSha196Aes256,
        17 => ChecksumSuite::HmacSha196Aes128,
        e => return Err(format!("etype {e} not supported")),
    };
    suite.hasher().checksum(key, usage, data).map_err(|e| e.to_string())
}

/// A Wrap token with confidentiality (RFC 4121 4.2.6.2): header, then the encryption of
/// `data | header` (EC 0, RRC 0 inside), rotated right by [`RRC`].
pub fn wrap(etype: u8, key: &[u8], usage: i32, flags: u8, seq: u64, data: &[u8]) -> Result<Vec<u8>, String> {
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&[0x05, 0x04, flags | SEALED, 0xff]);
    header[8..].copy_from_slice(&seq.to_be_bytes());
    let mut plain = data.to_vec();
    plain.extend_from_slice(&header);
    let mut sealed = cipher(etype)?.encrypt(key, usage, &plain).map_err(|e| e.to_string())?;
    let n = sealed.len();
    sealed.rotate_right(usize::from(RRC) % n);
    header[6..8].copy_from_slice(&RRC.to_be_bytes());
    let mut out = header.to_vec();
    out.extend_from_slice(&sealed);
    Ok(out)
}

/// Reads a sealed Wrap token: (flags, sequence number, data). Every field is checked against
/// the copy of the header inside the encryption.
pub fn unwrap(etype: u8, key: &[u8], usage: i32, token: &[u8]) -> Result<(u8, u64, Vec<u8>), String> {
    if token.len() < 16 + 16 || token[..2] != [0x05, 0x04] || token[3] != 0xff {
        return Err("not a Wrap token".into());
    }
    let flags = token[2];
    if flags & SEALED == 0 {
        return Err("Wrap token without confidentiality".into());
    }
    let ec = usize::from(u16::from_be_bytes([token[4], token[5]]));
    let rrc = usize::from(u16::from_be_bytes([token[6], token[7]]));
    let mut sealed = token[16..].to_vec();
    let n = sealed.len();
    sealed.rotate_left((rrc + ec) % n);
    let plain = cipher(etype)?
        .decrypt(key, usage, &sealed)
        .map_err(|_| "does not decrypt with the context key".to_owned())?;
    if plain.len() < 16 + ec {
        return Err("Wrap token too short".into());
    }
    let (data, inner) = plain.split_at(plain.len() - 16);
    let mut expect = [0u8; 16];
    expect.copy_from_slice(&token[..16]);
    expect[6..8].copy_from_slice(&[0, 0]);
    if inner != expect {
        return Err("the header inside the Wrap token differs from the one outside".into());
    }
    let seq = u64::from_be_bytes([
        token[8], token[9], token[10], token[11], token[12], token[13], token[14], token[15],
    ]);
    Ok((flags, seq, data[..data.len() - ec].to_vec()))
}

/// A MIC token (RFC 4121 4.2.6.1) over `data`.
pub fn mic(etype: u8, key: &[u8], usage: i32, flags: u8, seq: u64, data: &[u8]) -> Result<Vec<u8>, String> {
    let mut header = [0xffu8; 16];
    header[..3].copy_from_slice(&[0x04, 0x04, flags & !SEALED]);
    header[8..].copy_from_slice(&seq.to_be_bytes());
    let mut signed = data.to_vec();
    signed.extend_from_slice(&header);
    let mut out = header.to_vec();
    out.extend_from_slice(&checksum(etype, key, usage, &signed)?);
    Ok(out)
}

/// Verifies a MIC token over `data`: its flags.
pub fn verify_mic(etype: u8, key: &[u8], usage: i32, token: &[u8], data: &[u8]) -> Result<u8, String> {
    if token.len() < 16 + 12 || token[..2] != [0x04, 0x04] || token[3..8] != [0xff; 5] {
        return Err("not a MIC token".into());
    }
    let (header, got) = token.split_at(16);
    let mut signed = data.to_vec();
    signed.extend_from_slice(header);
    let want = checksum(etype, key, usage, &signed)?;
    let differ = want.len() != got.len() || want.iter().zip(got).fold(0u8, |acc, (a, b)| acc | (a ^ b)) != 0;
    if differ {
        return Err("the MIC does not verify".into());
    }
    Ok(header[2])
}

// ------------------------------------------------------------------ the client

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Initial,
    ApReqSent,
    PubKeyAuthSent,
    Finished,
}

/// One CredSSP client exchange with Kerberos.
pub struct KrbClient {
    st: Arc<ServiceTicket>,
    entropy: KrbEntropy,
    ctime: (UnixSecs, u32),
    state: State,
    server_version: u32,
    /// The context key: (etype, key, true when it is the acceptor's subkey).
    key: Option<(u8, Zeroizing<Vec<u8>>, bool)>,
    public_key: Vec<u8>,
}

impl std::fmt::Debug for KrbClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KrbClient")
            .field("service", &self.st.principal)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl KrbClient {
    /// A client presenting `st`; `now`/`usec` go in the authenticator.
    pub fn new(st: Arc<ServiceTicket>, now: UnixSecs, usec: u32, entropy: KrbEntropy) -> Self {
        KrbClient {
            st,
            entropy,
            ctime: (now, usec % 1_000_000),
            state: State::Initial,
            server_version: 0,
            key: None,
            public_key: Vec::new(),
        }
    }

    /// The service the ticket is for.
    pub fn principal(&self) -> &str {
        &self.st.principal
    }

    /// The server's TSRequest version (0 until it answered).
    pub fn server_version(&self) -> u32 {
        self.server_version
    }

    fn subkey(&self) -> Zeroizing<Vec<u8>> {
        let n = if self.st.etype == 17 { 16 } else { 32 };
        Zeroizing::new(self.entropy.subkey[..n].to_vec())
    }

    /// The first TSRequest: the AP-REQ in SPNEGO.
    pub fn start(&mut self) -> Result<Vec<u8>, KrbRefusal> {
        if self.state != State::Initial {
            return Err(KrbRefusal::Internal("start called twice".into()));
        }
        self.state = State::Finished;
        let ap = messages::ap_req(&self.st, self.ctime.0, self.ctime.1, &self.subkey(), self.entropy.seq)
            .map_err(|e| KrbRefusal::Internal(e.to_string()))?;
        let token = neg_token_init(&krb5_token([0x01, 0x00], &ap));
        self.state = State::ApReqSent;
        Ok(tsrequest::encode(&TsRequest {
            version: CLIENT_VERSION,
            nego_tokens: vec![token],
            ..TsRequest::default()
        }))
    }

    fn read(&mut self, bytes: &[u8]) -> Result<TsRequest, KrbRefusal> {
        let ts = tsrequest::decode(bytes).map_err(KrbRefusal::NotTsRequest)?;
        self.server_version = ts.version;
        if let Some(status) = ts.error_code {
            let krb = ts
                .nego_tokens
                .first()
                .and_then(|t| read_neg_token_resp(t).ok())
                .and_then(|r| r.response_token)
                .and_then(|t| {
                    let (id, msg) = read_krb5_token(&t).ok()?;
                    (id == [0x03, 0x00]).then_some(())?;
                    match messages::read_answer(msg).ok()? {
                        AsAnswer::Error(e) => Some(e),
                        AsAnswer::Rep => None,
                    }
                });
            return Err(KrbRefusal::ErrorCode {
                version: ts.version,
                status,
                krb,
            });
        }
        Ok(ts)
    }

    /// Reads the server's answer to the AP-REQ and, when it proves the server holds the
    /// service's key, returns the TSRequest with pubKeyAuth bound to `server_public_key`.
    pub fn on_ap_rep(&mut self, bytes: &[u8], server_public_key: &[u8]) -> Result<Vec<u8>, KrbRefusal> {
        if self.state != State::ApReqSent {
            return Err(KrbRefusal::Internal("AP-REP read out of order".into()));
        }
        self.state = State::Finished;
        let ts = self.read(bytes)?;
        let token = ts
            .nego_tokens
            .first()
            .ok_or_else(|| KrbRefusal::Malformed("answer without a SPNEGO token".into()))?;
        let resp = read_neg_token_resp(token)?;
        if let Some(mech) = resp.supported_mech.as_deref() {
            if mech != OID_KRB5 && mech != OID_MS_KRB5 {
                return Err(KrbRefusal::Rejected {
                    mech: Some(mech_name(mech)),
                });
            }
        }
        let Some(rt) = resp.response_token.as_deref() else {
            return Err(if resp.neg_state == Some(2) {
                KrbRefusal::Rejected { mech: None }
            } else {
                KrbRefusal::Malformed("SPNEGO answer without a responseToken".into())
            });
        };
        let (tok_id, msg) = read_krb5_token(rt)?;
        match tok_id {
            [0x02, 0x00] => {}
            [0x03, 0x00] => {
                return Err(match messages::read_answer(msg) {
                    Ok(AsAnswer::Error(e)) => KrbRefusal::KrbError(e),
                    _ => KrbRefusal::Malformed("KRB-ERROR token not readable".into()),
                })
            }
            other => return Err(KrbRefusal::Malformed(format!("GSS TOK_ID {other:02x?}"))),
        }
        let part = messages::read_ap_rep(msg, &self.st).map_err(|e| match e {
            messages::KrbMsgError::Internal(e) => KrbRefusal::Internal(e),
            other => KrbRefusal::MutualAuth(other.to_string()),
        })?;
        if (part.ctime, part.cusec) != self.ctime {
            return Err(KrbRefusal::MutualAuth(
                "the AP-REP does not echo our authenticator's time".into(),
            ));
        }
        let key = match &part.subkey {
            Some((etype, k)) if messages::suite(*etype).is_some() => (*etype, k.clone(), true),
            Some((etype, _)) => return Err(KrbRefusal::MutualAuth(format!("acceptor subkey etype {etype}"))),
            None => (self.st.etype, self.subkey(), false),
        };
        let flags = if key.2 { ACCEPTOR_SUBKEY } else { 0 };
        let mut seq = u64::from(self.entropy.seq);
        let mut nego_tokens = Vec::new();
        if let Some(their_mic) = resp.mech_list_mic.as_deref() {
            let got = verify_mic(key.0, &key.1, ACCEPTOR_SIGN, their_mic, &mech_types())
                .map_err(|e| KrbRefusal::MutualAuth(format!("mechListMIC: {e}")))?;
            if got & SENT_BY_ACCEPTOR == 0 {
                return Err(KrbRefusal::MutualAuth("mechListMIC not sent by the acceptor".into()));
            }
            let ours = mic(key.0, &key.1, INITIATOR_SIGN, flags, seq, &mech_types()).map_err(KrbRefusal::Internal)?;
            seq += 1;
            nego_tokens.push(neg_token_resp_mic(&ours));
        }
        let version = ts.version.min(CLIENT_VERSION);
        let plain = if version >= 5 {
            binding_hash(CLIENT_SERVER_MAGIC, &self.entropy.nonce, server_public_key)
        } else {
            server_public_key.to_vec()
        };
        let pub_key_auth = wrap(key.0, &key.1, INITIATOR_SEAL, flags, seq, &plain).map_err(KrbRefusal::Internal)?;
        self.key = Some(key);
        self.public_key = server_public_key.to_vec();
        self.state = State::PubKeyAuthSent;
        Ok(tsrequest::encode(&TsRequest {
            version: CLIENT_VERSION,
            nego_tokens,
            pub_key_auth: Some(pub_key_auth),
            client_nonce: (version >= 5).then(|| self.entropy.nonce.to_vec()),
            ..TsRequest::default()
        }))
    }

    /// Reads the server's pubKeyAuth: `Ok` when it proves the server holding the TLS key
    /// accepted the logon.
    pub fn on_answer(&mut self, bytes: &[u8]) -> Result<(), KrbRefusal> {
        if self.state != State::PubKeyAuthSent {
            return Err(KrbRefusal::Internal("pubKeyAuth read out of order".into()));
        }
        self.state = State::Finished;
        let ts = self.read(bytes)?;
        let token = ts.pub_key_auth.ok_or(KrbRefusal::NoPubKeyAuth)?;
        let (etype, key, _) = self
            .key
            .as_ref()
            .ok_or_else(|| KrbRefusal::Internal("no context key".into()))?;
        let (flags, _, plain) = unwrap(*etype, key, ACCEPTOR_SEAL, &token)
            .map_err(|_| KrbRefusal::PubKeyAuthMismatch("does not unwrap with the Kerberos context key"))?;
        if flags & SENT_BY_ACCEPTOR == 0 {
            return Err(KrbRefusal::PubKeyAuthMismatch("is not marked as sent by the acceptor"));
        }
        let expected = if ts.version.min(CLIENT_VERSION) >= 5 {
            binding_hash(SERVER_CLIENT_MAGIC, &self.entropy.nonce, &self.public_key)
        } else {
            let mut k = self.public_key.clone();
            increment_le(&mut k);
            k
        };
        if plain != expected {
            return Err(KrbRefusal::PubKeyAuthMismatch(
                "does not match the TLS public key this connection saw",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spnego_init_is_framed_as_rfc_4178_says() {
        let t = neg_token_init(&[0xAA]);
        // 60 L 06 06 <spnego> a0 L 30 L a0 L 30 L 06 09 <ms-krb5> 06 09 <krb5> a2 03 04 01 aa
        assert_eq!(t[0], 0x60);
        assert_eq!(&t[2..10], &[0x06, 0x06, 0x2b, 0x06, 0x01, 0x05, 0x05, 0x02]);
        let tail = [0xa2, 0x03, 0x04, 0x01, 0xAA];
        assert_eq!(&t[t.len() - 5..], &tail);
        let mt = mech_types();
        assert_eq!(mt[..4], [0x30, 0x16, 0x06, 0x09]);
        assert_eq!(&mt[4..13], OID_MS_KRB5);
        assert_eq!(&mt[15..], OID_KRB5);
        assert!(
            !t.windows(OID_NTLM.len()).any(|w| w == OID_NTLM),
            "NTLM is never offered"
        );
    }

    /// A NegTokenResp written by hand: accept-completed, supportedMech krb5, responseToken
    /// 0x01 0x02, mechListMIC 0x03.
    #[test]
    fn neg_token_resp_is_read() {
        let mut v = vec![0xa1, 0x1f, 0x30, 0x1d];
        v.extend_from_slice(&[0xa0, 0x03, 0x0a, 0x01, 0x00]);
        v.extend_from_slice(&[0xa1, 0x0b, 0x06, 0x09]);
        v.extend_from_slice(OID_KRB5);
        v.extend_from_slice(&[0xa2, 0x04, 0x04, 0x02, 0x01, 0x02]);
        v.extend_from_slice(&[0xa3, 0x03, 0x04, 0x01, 0x03]);
        let r = read_neg_token_resp(&v).expect("reads");
        assert_eq!(r.neg_state, Some(0));
        assert_eq!(r.supported_mech.as_deref(), Some(OID_KRB5));
        assert_eq!(r.response_token.as_deref(), Some(&[1u8, 2][..]));
        assert_eq!(r.mech_list_mic.as_deref(), Some(&[3u8][..]));
        for bad in [&v[..3], &[0xa0, 0x00][..], &[0xa1, 0x02, 0x04, 0x00][..], &[][..]] {
            assert!(read_neg_token_resp(bad).is_err(), "{bad:02x?}");
        }
    }

    #[test]
    fn wrap_round_trips_and_refuses_tampering() {
        let key = [7u8; 32];
        let t = wrap(18, &key, INITIATOR_SEAL, 0, 41, b"binding hash").expect("wraps");
        assert_eq!(&t[..8], &[0x05, 0x04, SEALED, 0xff, 0, 0, 0, 28]);
        assert_eq!(u64::from_be_bytes(t[8..16].try_into().expect("8")), 41);
        assert_eq!(
            unwrap(18, &key, INITIATOR_SEAL, &t),
            Ok((SEALED, 41, b"binding hash".to_vec()))
        );
        // Another key usage (the acceptor's), a flipped byte, another header: refused.
        assert!(unwrap(18, &key, ACCEPTOR_SEAL, &t).is_err());
        let mut bad = t.clone();
        let n = bad.len();
        bad[n - 1] ^= 1;
        assert!(unwrap(18, &key, INITIATOR_SEAL, &bad).is_err());
        let mut hdr = t.clone();
        hdr[15] ^= 1;
        assert!(unwrap(18, &key, INITIATOR_SEAL, &hdr).is_err());
        // A token rotated by another RRC is read the same.
        let mut other = t[..16].to_vec();
        other[6..8].copy_from_slice(&0u16.to_be_bytes());
        let mut body = t[16..].to_vec();
        let n = body.len();
        body.rotate_left(28 % n);
        other.extend_from_slice(&body);
        assert_eq!(
            unwrap(18, &key, INITIATOR_SEAL, &other).map(|x| x.2),
            Ok(b"binding hash".to_vec())
        );
        for junk in [&[][..], &[0x05, 0x04][..], &t[..20]] {
            assert!(unwrap(18, &key, INITIATOR_SEAL, junk).is_err());
        }
    }

    #[test]
    fn mic_verifies_only_with_the_same_key_and_data() {
        let key = [9u8; 16];
        let m = mic(17, &key, ACCEPTOR_SIGN, SENT_BY_ACCEPTOR, 5, &mech_types()).expect("mic");
        assert_eq!(m.len(), 28);
        assert_eq!(
            verify_mic(17, &key, ACCEPTOR_SIGN, &m, &mech_types()),
            Ok(SENT_BY_ACCEPTOR)
        );
        assert!(verify_mic(17, &key, INITIATOR_SIGN, &m, &mech_types()).is_err());
        assert!(verify_mic(17, &[8u8; 16], ACCEPTOR_SIGN, &m, &mech_types()).is_err());
        assert!(verify_mic(17, &key, ACCEPTOR_SIGN, &m, b"other").is_err());
    }

    #[test]
    fn hostile_krb5_tokens_are_refusals() {
        assert!(read_krb5_token(&[]).is_err());
        assert!(
            read_krb5_token(&[0x60, 0x05, 0x06, 0x03, 1, 2, 3]).is_err(),
            "wrong OID"
        );
        let t = krb5_token([0x02, 0x00], &[0x6f, 0x00]);
        assert_eq!(read_krb5_token(&t), Ok(([0x02, 0x00], &[0x6f, 0x00][..])));
    }
}
