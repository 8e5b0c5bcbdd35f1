//! The server side of NTLM (MS-NLMP) as the CredSSP targets need it: parse NEGOTIATE, build a
//! CHALLENGE with target information, verify an NTLMv2 AUTHENTICATE against a password, derive
//! the session keys, and seal / unseal with NTLM session security (extended session security,
//! RC4). Every layout is written from MS-NLMP 2.2 and every computation from MS-NLMP 3.3 / 3.4;
//! the unit tests check them against the examples of MS-NLMP 4.2.4. No I/O here.

use hmac::{Hmac, KeyInit, Mac};
use md4::{Digest, Md4};
use md5::Md5;
use rc4::{Rc4, StreamCipher};

/// "NTLMSSP\0", the first 8 bytes of every NTLM message.
pub(crate) const SIGNATURE: [u8; 8] = *b"NTLMSSP\0";
/// MessageType of NEGOTIATE_MESSAGE.
pub(crate) const NEGOTIATE: u32 = 1;
/// MessageType of CHALLENGE_MESSAGE.
pub(crate) const CHALLENGE: u32 = 2;
/// MessageType of AUTHENTICATE_MESSAGE.
pub(crate) const AUTHENTICATE: u32 = 3;

/// NegotiateFlags bits (MS-NLMP 2.2.2.5).
pub(crate) mod flag {
    /// NTLMSSP_NEGOTIATE_UNICODE (A).
    pub(crate) const UNICODE: u32 = 0x0000_0001;
    /// NTLMSSP_REQUEST_TARGET (C).
    pub(crate) const REQUEST_TARGET: u32 = 0x0000_0004;
    /// NTLMSSP_NEGOTIATE_SIGN (D).
    pub(crate) const SIGN: u32 = 0x0000_0010;
    /// NTLMSSP_NEGOTIATE_SEAL (E).
    pub(crate) const SEAL: u32 = 0x0000_0020;
    /// NTLMSSP_NEGOTIATE_NTLM (H).
    pub(crate) const NTLM: u32 = 0x0000_0200;
    /// NTLMSSP_NEGOTIATE_ALWAYS_SIGN (M).
    pub(crate) const ALWAYS_SIGN: u32 = 0x0000_8000;
    /// NTLMSSP_TARGET_TYPE_DOMAIN (N).
    pub(crate) const TARGET_TYPE_DOMAIN: u32 = 0x0001_0000;
    /// NTLMSSP_NEGOTIATE_EXTENDED_SESSIONSECURITY (P).
    pub(crate) const EXTENDED_SESSIONSECURITY: u32 = 0x0008_0000;
    /// NTLMSSP_NEGOTIATE_TARGET_INFO (S).
    pub(crate) const TARGET_INFO: u32 = 0x0080_0000;
    /// NTLMSSP_NEGOTIATE_VERSION (T).
    pub(crate) const VERSION: u32 = 0x0200_0000;
    /// NTLMSSP_NEGOTIATE_128 (U).
    pub(crate) const NEGOTIATE_128: u32 = 0x2000_0000;
    /// NTLMSSP_NEGOTIATE_KEY_EXCH (V).
    pub(crate) const KEY_EXCH: u32 = 0x4000_0000;
    /// NTLMSSP_NEGOTIATE_56 (W).
    pub(crate) const NEGOTIATE_56: u32 = 0x8000_0000;
}

/// AvId values of AV_PAIR (MS-NLMP 2.2.2.1).
pub(crate) mod av {
    /// MsvAvEOL: end of the list.
    pub(crate) const EOL: u16 = 0;
    /// MsvAvNbComputerName.
    pub(crate) const NB_COMPUTER_NAME: u16 = 1;
    /// MsvAvNbDomainName.
    pub(crate) const NB_DOMAIN_NAME: u16 = 2;
    /// MsvAvDnsComputerName.
    pub(crate) const DNS_COMPUTER_NAME: u16 = 3;
    /// MsvAvDnsDomainName.
    pub(crate) const DNS_DOMAIN_NAME: u16 = 4;
    /// MsvAvDnsTreeName.
    pub(crate) const DNS_TREE_NAME: u16 = 5;
    /// MsvAvFlags (u32; 0x2 = the AUTHENTICATE message carries a MIC).
    pub(crate) const FLAGS: u16 = 6;
    /// MsvAvTimestamp (FILETIME).
    pub(crate) const TIMESTAMP: u16 = 7;
}

/// MsvAvFlags bit: the client provides a MIC in the AUTHENTICATE message.
pub(crate) const AV_FLAG_MIC: u32 = 0x0000_0002;

/// Offset of the MIC in an AUTHENTICATE message that carries one (after the 8-byte Version).
pub(crate) const MIC_OFFSET: usize = 72;

/// Seconds from 1601-01-01 (FILETIME epoch) to 1970-01-01.
const FILETIME_UNIX_OFFSET_SECS: i128 = 11_644_473_600;

/// A malformed NTLM message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum NtlmError {
    /// No "NTLMSSP\0" signature (e.g. a SPNEGO token).
    #[error("not an NTLMSSP message")]
    NotNtlm,
    /// Another MessageType than expected.
    #[error("NTLM message type {got}, expected {want}")]
    WrongType {
        /// MessageType found.
        got: u32,
        /// MessageType expected.
        want: u32,
    },
    /// A header shorter than its fixed part, or a field pointing outside the message.
    #[error("malformed NTLM message: {0}")]
    Malformed(&'static str),
    /// A sealed message whose signature does not verify.
    #[error("NTLM message signature mismatch")]
    BadSignature,
}

// ---------------------------------------------------------------- primitives

/// UTF-16LE bytes of `s` (MS-NLMP's UNICODE()).
pub(crate) fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

/// The string of UTF-16LE bytes, if they are well formed.
pub(crate) fn from_utf16le(bytes: &[u8]) -> Option<String> {
    if !bytes.len().is_multiple_of(2) {
        return None;
    }
    let units: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    String::from_utf16(&units).ok()
}

/// MD5 of the concatenation of `parts`.
pub(crate) fn md5(parts: &[&[u8]]) -> [u8; 16] {
    let mut h = Md5::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// HMAC_MD5(key, concatenation of `parts`).
pub(crate) fn hmac_md5(key: &[u8], parts: &[&[u8]]) -> [u8; 16] {
    // HMAC accepts keys of any length: new_from_slice cannot fail.
    let mut mac = match <Hmac<Md5> as KeyInit>::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    };
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// RC4K(key, data): a fresh RC4 stream over `data` (MS-NLMP 6, RC4K).
pub(crate) fn rc4k(key: &[u8; 16], data: &[u8]) -> Vec<u8> {
    let mut out = data.to_vec();
    rc4_handle(key).apply_keystream(&mut out);
    out
}

fn rc4_handle(key: &[u8; 16]) -> Rc4 {
    match Rc4::new_from_slice(key) {
        Ok(rc4) => rc4,
        Err(_) => unreachable!("RC4 takes 16-byte keys"),
    }
}

/// Constant-time equality of two byte strings (lengths are not secret).
pub(crate) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// NTOWFv1(password) = MD4(UNICODE(password)): the NT hash (MS-NLMP 3.3.1).
pub(crate) fn nt_hash(password: &str) -> [u8; 16] {
    Md4::digest(utf16le(password)).into()
}

/// NTOWFv2(password, user, domain) = HMAC_MD5(MD4(UNICODE(password)),
/// UNICODE(ConcatenationOf(Uppercase(user), domain))) (MS-NLMP 3.3.2). The domain is not
/// upper-cased.
pub(crate) fn ntowfv2(password: &str, user: &str, domain: &str) -> [u8; 16] {
    let identity = utf16le(&format!("{}{domain}", user.to_uppercase()));
    hmac_md5(&nt_hash(password), &[&identity])
}

/// FILETIME (100 ns intervals since 1601-01-01 UTC) of `unix_nanos` shifted by `skew_secs`,
/// clamped at 0 (a FILETIME cannot be earlier than 1601).
pub(crate) fn filetime(unix_nanos: i128, skew_secs: i64) -> u64 {
    let ticks = (unix_nanos / 100) + (FILETIME_UNIX_OFFSET_SECS + i128::from(skew_secs)) * 10_000_000;
    u64::try_from(ticks.max(0)).unwrap_or(u64::MAX)
}

/// The 8-byte VERSION structure (MS-NLMP 2.2.2.10): major, minor, build (LE), 3 reserved
/// bytes, NTLMRevisionCurrent = 0x0F.
pub(crate) fn version(major: u8, minor: u8, build: u16) -> [u8; 8] {
    let b = build.to_le_bytes();
    [major, minor, b[0], b[1], 0, 0, 0, 0x0f]
}

/// An AV_PAIR list: each pair as AvId u16 LE, AvLen u16 LE, value; then MsvAvEOL.
pub(crate) fn av_pairs(pairs: &[(u16, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (id, value) in pairs {
        let len = u16::try_from(value.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&id.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&value[..usize::from(len)]);
    }
    out.extend_from_slice(&[0, 0, 0, 0]); // MsvAvEOL, AvLen 0
    out
}

/// The pairs of an AV_PAIR list, up to (not including) MsvAvEOL. Bytes after MsvAvEOL are
/// ignored; a list without MsvAvEOL is malformed.
pub(crate) fn parse_av_pairs(mut bytes: &[u8]) -> Result<Vec<(u16, &[u8])>, NtlmError> {
    let mut out = Vec::new();
    loop {
        let (Some(id), Some(len)) = (le16(bytes, 0), le16(bytes, 2)) else {
            return Err(NtlmError::Malformed("AV_PAIR list without MsvAvEOL"));
        };
        if id == av::EOL {
            return Ok(out);
        }
        let end = 4 + usize::from(len);
        let value = bytes
            .get(4..end)
            .ok_or(NtlmError::Malformed("AV_PAIR longer than the list"))?;
        out.push((id, value));
        bytes = &bytes[end..];
    }
}

fn le16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Checks the signature and MessageType of an NTLM message.
fn check_header(msg: &[u8], want: u32) -> Result<(), NtlmError> {
    if msg.get(..8) != Some(&SIGNATURE[..]) {
        return Err(NtlmError::NotNtlm);
    }
    let got = le32(msg, 8).ok_or(NtlmError::Malformed("no MessageType"))?;
    if got != want {
        return Err(NtlmError::WrongType { got, want });
    }
    Ok(())
}

/// The payload a `*Fields` structure (Len u16, MaxLen u16, BufferOffset u32) at `at` points to.
fn field<'a>(msg: &'a [u8], at: usize, name: &'static str) -> Result<&'a [u8], NtlmError> {
    let len = le16(msg, at).ok_or(NtlmError::Malformed(name))?;
    let offset = le32(msg, at + 4).ok_or(NtlmError::Malformed(name))?;
    if len == 0 {
        return Ok(&[]);
    }
    let start = usize::try_from(offset).map_err(|_| NtlmError::Malformed(name))?;
    let end = start.checked_add(usize::from(len)).ok_or(NtlmError::Malformed(name))?;
    msg.get(start..end).ok_or(NtlmError::Malformed(name))
}

fn text(bytes: &[u8], unicode: bool, name: &'static str) -> Result<String, NtlmError> {
    if unicode {
        from_utf16le(bytes).ok_or(NtlmError::Malformed(name))
    } else {
        // OEM code page: ASCII is all a simulated server needs to recognise.
        Ok(bytes.iter().map(|&b| char::from(b)).collect())
    }
}

// ---------------------------------------------------------------- messages

/// The part of a NEGOTIATE_MESSAGE (MS-NLMP 2.2.1.1) the server uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Negotiate {
    /// NegotiateFlags.
    pub(crate) flags: u32,
}

/// Parses a NEGOTIATE_MESSAGE: Signature(8) | MessageType(4) = 1 | NegotiateFlags(4) | ...
pub(crate) fn parse_negotiate(msg: &[u8]) -> Result<Negotiate, NtlmError> {
    check_header(msg, NEGOTIATE)?;
    let flags = le32(msg, 12).ok_or(NtlmError::Malformed("NEGOTIATE shorter than its flags"))?;
    Ok(Negotiate { flags })
}

/// The flags a server answers a NEGOTIATE with: what it always sets (UNICODE, REQUEST_TARGET,
/// NTLM, ALWAYS_SIGN, TARGET_TYPE_DOMAIN, EXTENDED_SESSIONSECURITY, TARGET_INFO, VERSION) plus
/// the client's SIGN, SEAL, 128, 56 and KEY_EXCH when asked for.
pub(crate) fn challenge_flags(client: u32) -> u32 {
    let echoed = flag::SIGN | flag::SEAL | flag::NEGOTIATE_128 | flag::NEGOTIATE_56 | flag::KEY_EXCH;
    flag::UNICODE
        | flag::REQUEST_TARGET
        | flag::NTLM
        | flag::ALWAYS_SIGN
        | flag::TARGET_TYPE_DOMAIN
        | flag::EXTENDED_SESSIONSECURITY
        | flag::TARGET_INFO
        | flag::VERSION
        | (client & echoed)
}

/// A CHALLENGE_MESSAGE (MS-NLMP 2.2.1.2):
///
/// ```text
///  0 Signature "NTLMSSP\0"        8 MessageType = 2 (u32 LE)
/// 12 TargetNameFields (Len u16, MaxLen u16, Offset u32)
/// 20 NegotiateFlags (u32 LE)     24 ServerChallenge (8)     32 Reserved (8 zero bytes)
/// 40 TargetInfoFields (Len, MaxLen, Offset)                 48 Version (8)
/// 56 Payload: TargetName (UTF-16LE), then TargetInfo (AV_PAIR list)
/// ```
pub(crate) fn challenge_message(
    flags: u32,
    server_challenge: &[u8; 8],
    target_name: &str,
    target_info: &[u8],
    version: &[u8; 8],
) -> Vec<u8> {
    const HEADER: usize = 56;
    let name = utf16le(target_name);
    let name_len = u16::try_from(name.len()).unwrap_or(0);
    let info_len = u16::try_from(target_info.len()).unwrap_or(0);
    let name_offset = HEADER as u32;
    let info_offset = name_offset + u32::from(name_len);
    let mut m = Vec::with_capacity(HEADER + name.len() + target_info.len());
    m.extend_from_slice(&SIGNATURE);
    m.extend_from_slice(&CHALLENGE.to_le_bytes());
    m.extend_from_slice(&name_len.to_le_bytes()); // TargetNameLen
    m.extend_from_slice(&name_len.to_le_bytes()); // TargetNameMaxLen
    m.extend_from_slice(&name_offset.to_le_bytes()); // TargetNameBufferOffset
    m.extend_from_slice(&flags.to_le_bytes());
    m.extend_from_slice(server_challenge);
    m.extend_from_slice(&[0; 8]); // Reserved
    m.extend_from_slice(&info_len.to_le_bytes()); // TargetInfoLen
    m.extend_from_slice(&info_len.to_le_bytes()); // TargetInfoMaxLen
    m.extend_from_slice(&info_offset.to_le_bytes()); // TargetInfoBufferOffset
    m.extend_from_slice(version);
    m.extend_from_slice(&name[..usize::from(name_len)]);
    m.extend_from_slice(&target_info[..usize::from(info_len)]);
    m
}

/// An AUTHENTICATE_MESSAGE (MS-NLMP 2.2.1.3), fields resolved:
///
/// ```text
///  0 Signature   8 MessageType = 3   12 LmChallengeResponseFields   20 NtChallengeResponseFields
/// 28 DomainNameFields   36 UserNameFields   44 WorkstationFields
/// 52 EncryptedRandomSessionKeyFields   60 NegotiateFlags   64 Version (8)   72 MIC (16, if any)
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Authenticate<'a> {
    /// LmChallengeResponse (24 zero bytes from clients that saw MsvAvTimestamp).
    pub(crate) lm_response: &'a [u8],
    /// NtChallengeResponse: NTProofStr (16) || the NTLMv2 client challenge blob ("temp").
    pub(crate) nt_response: &'a [u8],
    /// DomainName as sent.
    pub(crate) domain: String,
    /// UserName as sent.
    pub(crate) user: String,
    /// Workstation as sent.
    pub(crate) workstation: String,
    /// EncryptedRandomSessionKey (16 bytes with KEY_EXCH, else usually empty).
    pub(crate) encrypted_session_key: &'a [u8],
    /// NegotiateFlags: the flags both sides now use.
    pub(crate) flags: u32,
}

/// Parses an AUTHENTICATE_MESSAGE; every field must lie inside the message.
pub(crate) fn parse_authenticate(msg: &[u8]) -> Result<Authenticate<'_>, NtlmError> {
    check_header(msg, AUTHENTICATE)?;
    let flags = le32(msg, 60).ok_or(NtlmError::Malformed("AUTHENTICATE shorter than its header"))?;
    let unicode = flags & flag::UNICODE != 0;
    Ok(Authenticate {
        lm_response: field(msg, 12, "LmChallengeResponse")?,
        nt_response: field(msg, 20, "NtChallengeResponse")?,
        domain: text(field(msg, 28, "DomainName")?, unicode, "DomainName")?,
        user: text(field(msg, 36, "UserName")?, unicode, "UserName")?,
        workstation: text(field(msg, 44, "Workstation")?, unicode, "Workstation")?,
        encrypted_session_key: field(msg, 52, "EncryptedRandomSessionKey")?,
        flags,
    })
}

/// Length of the fixed part of the NTLMv2 client challenge blob ("temp") before its AV pairs:
/// RespType 1, HiRespType 1, Reserved1 2, Reserved2 4, TimeStamp 8, ChallengeFromClient 8,
/// Reserved3 4.
const BLOB_HEADER: usize = 28;

/// The AV pairs the client put in its NTLMv2 blob (the server's, possibly with MsvAvFlags,
/// MsvAvTargetName … added).
pub(crate) fn blob_av_pairs(nt_response: &[u8]) -> Result<Vec<(u16, &[u8])>, NtlmError> {
    let pairs = nt_response
        .get(16 + BLOB_HEADER..)
        .ok_or(NtlmError::Malformed("NTLMv2 response too short"))?;
    parse_av_pairs(pairs)
}

/// Whether the client's blob says the AUTHENTICATE message carries a MIC.
pub(crate) fn has_mic(nt_response: &[u8]) -> bool {
    blob_av_pairs(nt_response).is_ok_and(|pairs| {
        pairs
            .iter()
            .any(|(id, v)| *id == av::FLAGS && le32(v, 0).is_some_and(|f| f & AV_FLAG_MIC != 0))
    })
}

/// NTProofStr = HMAC_MD5(ResponseKeyNT, ConcatenationOf(ServerChallenge, temp)) (MS-NLMP
/// 3.3.2).
pub(crate) fn nt_proof_str(response_key_nt: &[u8; 16], server_challenge: &[u8; 8], temp: &[u8]) -> [u8; 16] {
    hmac_md5(response_key_nt, &[server_challenge, temp])
}

/// Verifies an NTLMv2 NtChallengeResponse made with `response_key_nt` (NTOWFv2) for
/// `server_challenge`; returns the SessionBaseKey = HMAC_MD5(ResponseKeyNT, NTProofStr) when
/// the proof is right. NTLMv1 responses (24 bytes) and anonymous ones never verify.
pub(crate) fn verify_ntlmv2(
    response_key_nt: &[u8; 16],
    server_challenge: &[u8; 8],
    nt_response: &[u8],
) -> Option<[u8; 16]> {
    if nt_response.len() < 16 + BLOB_HEADER {
        return None;
    }
    let (proof, temp) = nt_response.split_at(16);
    // RespType and HiRespType are both 1.
    if temp[0] != 1 || temp[1] != 1 {
        return None;
    }
    let expected = nt_proof_str(response_key_nt, server_challenge, temp);
    ct_eq(proof, &expected).then(|| hmac_md5(response_key_nt, &[&expected]))
}

/// ExportedSessionKey from the KeyExchangeKey (= SessionBaseKey in NTLMv2): with KEY_EXCH the
/// client's random key, RC4K(KeyExchangeKey, EncryptedRandomSessionKey); without it the
/// KeyExchangeKey itself (MS-NLMP 3.2.5.1.2 / 3.3.2).
pub(crate) fn exported_session_key(
    flags: u32,
    key_exchange_key: &[u8; 16],
    encrypted_session_key: &[u8],
) -> Result<[u8; 16], NtlmError> {
    if flags & flag::KEY_EXCH == 0 {
        return Ok(*key_exchange_key);
    }
    let encrypted: &[u8; 16] = encrypted_session_key
        .try_into()
        .map_err(|_| NtlmError::Malformed("EncryptedRandomSessionKey is not 16 bytes"))?;
    let mut key = *encrypted;
    rc4_handle(key_exchange_key).apply_keystream(&mut key);
    Ok(key)
}

/// MIC = HMAC_MD5(ExportedSessionKey, ConcatenationOf(NEGOTIATE, CHALLENGE, AUTHENTICATE with
/// its MIC field zeroed)) (MS-NLMP 3.2.5.1.2).
pub(crate) fn mic(
    exported_session_key: &[u8; 16],
    negotiate: &[u8],
    challenge: &[u8],
    authenticate: &[u8],
) -> [u8; 16] {
    let mut zeroed = authenticate.to_vec();
    if let Some(m) = zeroed.get_mut(MIC_OFFSET..MIC_OFFSET + 16) {
        m.fill(0);
    }
    hmac_md5(exported_session_key, &[negotiate, challenge, &zeroed])
}

// ---------------------------------------------------------------- session security

/// Which end of the NTLM session this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Side {
    /// The client (initiator).
    Client,
    /// The server (acceptor).
    Server,
}

const CLIENT_SIGN_MAGIC: &[u8] = b"session key to client-to-server signing key magic constant\0";
const SERVER_SIGN_MAGIC: &[u8] = b"session key to server-to-client signing key magic constant\0";
const CLIENT_SEAL_MAGIC: &[u8] = b"session key to client-to-server sealing key magic constant\0";
const SERVER_SEAL_MAGIC: &[u8] = b"session key to server-to-client sealing key magic constant\0";

/// SIGNKEY (MS-NLMP 3.4.5.2), extended session security: MD5(ExportedSessionKey || magic).
pub(crate) fn sign_key(exported_session_key: &[u8; 16], from: Side) -> [u8; 16] {
    let magic = match from {
        Side::Client => CLIENT_SIGN_MAGIC,
        Side::Server => SERVER_SIGN_MAGIC,
    };
    md5(&[exported_session_key, magic])
}

/// SEALKEY (MS-NLMP 3.4.5.3), extended session security: MD5 of the ExportedSessionKey cut to
/// 16 (NEGOTIATE_128), 7 (NEGOTIATE_56) or 5 bytes, and the magic constant.
pub(crate) fn seal_key(flags: u32, exported_session_key: &[u8; 16], from: Side) -> [u8; 16] {
    let magic = match from {
        Side::Client => CLIENT_SEAL_MAGIC,
        Side::Server => SERVER_SEAL_MAGIC,
    };
    let len = if flags & flag::NEGOTIATE_128 != 0 {
        16
    } else if flags & flag::NEGOTIATE_56 != 0 {
        7
    } else {
        5
    };
    md5(&[&exported_session_key[..len], magic])
}

/// NTLM session security with extended session security (MS-NLMP 3.4.3 / 3.4.4.2): one RC4
/// stream and sequence number per direction, for the whole session.
pub(crate) struct SessionSecurity {
    sign_out: [u8; 16],
    seal_out: Rc4,
    seq_out: u32,
    sign_in: [u8; 16],
    seal_in: Rc4,
    seq_in: u32,
    key_exch: bool,
}

impl std::fmt::Debug for SessionSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionSecurity")
            .field("seq_out", &self.seq_out)
            .field("seq_in", &self.seq_in)
            .finish_non_exhaustive()
    }
}

impl SessionSecurity {
    /// Keys for `side` of a session with these negotiated flags.
    pub(crate) fn new(exported_session_key: &[u8; 16], flags: u32, side: Side) -> SessionSecurity {
        let other = match side {
            Side::Client => Side::Server,
            Side::Server => Side::Client,
        };
        SessionSecurity {
            sign_out: sign_key(exported_session_key, side),
            seal_out: rc4_handle(&seal_key(flags, exported_session_key, side)),
            seq_out: 0,
            sign_in: sign_key(exported_session_key, other),
            seal_in: rc4_handle(&seal_key(flags, exported_session_key, other)),
            seq_in: 0,
            key_exch: flags & flag::KEY_EXCH != 0,
        }
    }

    /// Seals `message` as CredSSP carries it: the 16-byte NTLMSSP_MESSAGE_SIGNATURE
    /// (Version 1 | Checksum 8 | SeqNum) followed by the RC4-encrypted message. The message is
    /// encrypted first, then the checksum with the same RC4 stream.
    pub(crate) fn seal(&mut self, message: &[u8]) -> Vec<u8> {
        let seq = self.seq_out.to_le_bytes();
        let mut encrypted = message.to_vec();
        self.seal_out.apply_keystream(&mut encrypted);
        let mut checksum = [0u8; 8];
        checksum.copy_from_slice(&hmac_md5(&self.sign_out, &[&seq, message])[..8]);
        if self.key_exch {
            self.seal_out.apply_keystream(&mut checksum);
        }
        self.seq_out = self.seq_out.wrapping_add(1);
        let mut out = Vec::with_capacity(16 + message.len());
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&checksum);
        out.extend_from_slice(&seq);
        out.extend_from_slice(&encrypted);
        out
    }

    /// Unseals a token made by [`SessionSecurity::seal`] at the other end and checks its
    /// signature and sequence number.
    pub(crate) fn unseal(&mut self, token: &[u8]) -> Result<Vec<u8>, NtlmError> {
        if token.len() < 16 {
            return Err(NtlmError::Malformed("sealed message shorter than its signature"));
        }
        let (signature, encrypted) = token.split_at(16);
        let seq = self.seq_in.to_le_bytes();
        let mut message = encrypted.to_vec();
        self.seal_in.apply_keystream(&mut message);
        let mut checksum = [0u8; 8];
        checksum.copy_from_slice(&hmac_md5(&self.sign_in, &[&seq, &message])[..8]);
        if self.key_exch {
            self.seal_in.apply_keystream(&mut checksum);
        }
        self.seq_in = self.seq_in.wrapping_add(1);
        let version_ok = signature[..4] == 1u32.to_le_bytes();
        let seq_ok = signature[12..16] == seq;
        if version_ok && seq_ok && ct_eq(&signature[4..12], &checksum) {
            Ok(message)
        } else {
            Err(NtlmError::BadSignature)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn unhex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    // MS-NLMP 4.2.1 common values and 4.2.4 (NTLMv2 authentication).
    const SERVER_CHALLENGE: [u8; 8] = [0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef];
    const CLIENT_CHALLENGE: [u8; 8] = [0xaa; 8];
    const RANDOM_SESSION_KEY: [u8; 16] = [0x55; 16];
    /// 4.2.4.3 CHALLENGE_MESSAGE.
    const SPEC_CHALLENGE: &str = "4e544c4d53535000020000000c000c003800000033828ae20123456789abcdef
        00000000000000002400240044000000060070170000000f53006500720076006500720002000c0044006f006d00
        610069006e0001000c0053006500720076006500720000000000";
    /// 4.2.4.3 AUTHENTICATE_MESSAGE (user "User", domain "Domain", workstation "COMPUTER",
    /// KEY_EXCH, no MIC).
    const SPEC_AUTHENTICATE: &str = "4e544c4d5353500003000000180018006c00000054005400840000000c000c00
        480000000800080054000000100010005c00000010001000d8000000358288e20501280a0000000f44006f006d00
        610069006e00550073006500720043004f004d005000550054004500520086c35097ac9cec102554764a57cccc19
        aaaaaaaaaaaaaaaa68cd0ab851e51c96aabc927bebef6a1c01010000000000000000000000000000aaaaaaaaaaaa
        aaaa0000000002000c0044006f006d00610069006e0001000c005300650072007600650072000000000000000000
        c5dad2544fc9799094ce1ce90bc9d03e";
    /// 4.2.4.1.3 temp (the NTLMv2 blob): header, time 0, client challenge, AV pairs, Z(4).
    const SPEC_TEMP: &str = "01010000000000000000000000000000aaaaaaaaaaaaaaaa00000000
        02000c0044006f006d00610069006e0001000c0053006500720076006500720000000000 00000000";

    fn spec_target_info() -> Vec<u8> {
        av_pairs(&[
            (av::NB_DOMAIN_NAME, &utf16le("Domain")),
            (av::NB_COMPUTER_NAME, &utf16le("Server")),
        ])
    }

    #[test]
    fn ntowfv2_and_nt_hash_match_4_2_4_1_1() {
        assert_eq!(hex(&nt_hash("Password")), "a4f49c406510bdcab6824ee7c30fd852");
        assert_eq!(
            hex(&ntowfv2("Password", "User", "Domain")),
            "0c868a403bfd7a93a3001ef22ef02e3f"
        );
        // The user name is upper-cased, the domain is not.
        assert_eq!(
            ntowfv2("Password", "user", "Domain"),
            ntowfv2("Password", "User", "Domain")
        );
        assert_ne!(
            ntowfv2("Password", "User", "DOMAIN"),
            ntowfv2("Password", "User", "Domain")
        );
    }

    #[test]
    fn ntlmv2_proof_and_session_base_key_match_4_2_4() {
        let key = ntowfv2("Password", "User", "Domain");
        let temp = unhex(SPEC_TEMP);
        // The spec's temp is built from the same AV pairs as the spec's target info.
        assert_eq!(&temp[BLOB_HEADER..temp.len() - 4], &spec_target_info()[..]);
        let proof = nt_proof_str(&key, &SERVER_CHALLENGE, &temp);
        assert_eq!(hex(&proof), "68cd0ab851e51c96aabc927bebef6a1c");
        let mut response = proof.to_vec();
        response.extend_from_slice(&temp);
        let base = verify_ntlmv2(&key, &SERVER_CHALLENGE, &response).unwrap();
        assert_eq!(hex(&base), "8de40ccadbc14a82f15cb0ad0de95ca3");
        // Any other password, challenge or blob fails.
        assert!(verify_ntlmv2(&ntowfv2("password", "User", "Domain"), &SERVER_CHALLENGE, &response).is_none());
        assert!(verify_ntlmv2(&key, &[0; 8], &response).is_none());
        let mut tampered = response.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(verify_ntlmv2(&key, &SERVER_CHALLENGE, &tampered).is_none());
        assert!(
            verify_ntlmv2(&key, &SERVER_CHALLENGE, &response[..24]).is_none(),
            "NTLMv1 length"
        );
        // LMv2 (4.2.4.2.1), for completeness: HMAC_MD5(ResponseKeyLM, server || client) || client.
        let lm = hmac_md5(&key, &[&SERVER_CHALLENGE, &CLIENT_CHALLENGE]);
        assert_eq!(hex(&lm), "86c35097ac9cec102554764a57cccc19");
    }

    #[test]
    fn key_exchange_and_session_keys_match_4_2_4() {
        let base: [u8; 16] = unhex("8de40ccadbc14a82f15cb0ad0de95ca3").try_into().unwrap();
        // 4.2.4.2.3: EncryptedSessionKey = RC4K(KeyExchangeKey, RandomSessionKey).
        let encrypted = rc4k(&base, &RANDOM_SESSION_KEY);
        assert_eq!(hex(&encrypted), "c5dad2544fc9799094ce1ce90bc9d03e");
        let flags = 0xe288_8235;
        assert_eq!(
            exported_session_key(flags, &base, &encrypted).unwrap(),
            RANDOM_SESSION_KEY
        );
        assert_eq!(exported_session_key(flags & !flag::KEY_EXCH, &base, &[]).unwrap(), base);
        assert!(exported_session_key(flags, &base, &encrypted[..8]).is_err());
        assert_eq!(
            hex(&seal_key(flags, &RANDOM_SESSION_KEY, Side::Client)),
            "59f600973cc4960a25480a7c196e4c58"
        );
        assert_eq!(
            hex(&sign_key(&RANDOM_SESSION_KEY, Side::Client)),
            "4788dc861b4782f35d43fd98fe1a2d39"
        );
    }

    #[test]
    fn sealing_matches_4_2_4_4_and_round_trips() {
        let flags = 0xe288_8235;
        let plaintext = utf16le("Plaintext");
        let mut client = SessionSecurity::new(&RANDOM_SESSION_KEY, flags, Side::Client);
        let sealed = client.seal(&plaintext);
        assert_eq!(hex(&sealed[..16]), "010000007fb38ec5c55d497600000000");
        assert_eq!(hex(&sealed[16..]), "54e50165bf1936dc996020c1811b0f06fb5f");
        // The server reads it, and what it sends back the client reads; sequence numbers go on.
        let mut server = SessionSecurity::new(&RANDOM_SESSION_KEY, flags, Side::Server);
        assert_eq!(server.unseal(&sealed).unwrap(), plaintext);
        let back = server.seal(b"pong");
        assert_eq!(&back[12..16], &[0, 0, 0, 0]);
        assert_eq!(client.unseal(&back).unwrap(), b"pong");
        let again = client.seal(b"second");
        assert_eq!(&again[12..16], &[1, 0, 0, 0]);
        assert_eq!(server.unseal(&again).unwrap(), b"second");
        // A flipped bit, a replay and a short token are refused.
        let mut bad = client.seal(b"third");
        bad[20] ^= 1;
        assert_eq!(server.unseal(&bad), Err(NtlmError::BadSignature));
        assert_eq!(server.unseal(&again), Err(NtlmError::BadSignature));
        assert!(server.unseal(&[1, 0, 0]).is_err());
    }

    #[test]
    fn challenge_message_matches_4_2_4_3() {
        let built = challenge_message(
            0xe28a_8233,
            &SERVER_CHALLENGE,
            "Server",
            &spec_target_info(),
            &version(6, 0, 6000),
        );
        assert_eq!(hex(&built), hex(&unhex(SPEC_CHALLENGE)));
    }

    #[test]
    fn spec_authenticate_parses_and_verifies() {
        let msg = unhex(SPEC_AUTHENTICATE);
        let a = parse_authenticate(&msg).unwrap();
        assert_eq!(
            (a.user.as_str(), a.domain.as_str(), a.workstation.as_str()),
            ("User", "Domain", "COMPUTER")
        );
        assert_eq!(a.flags, 0xe288_8235);
        assert_eq!(hex(a.lm_response), "86c35097ac9cec102554764a57cccc19aaaaaaaaaaaaaaaa");
        assert!(!has_mic(a.nt_response));
        let key = ntowfv2("Password", &a.user, &a.domain);
        let base = verify_ntlmv2(&key, &SERVER_CHALLENGE, a.nt_response).unwrap();
        let exported = exported_session_key(a.flags, &base, a.encrypted_session_key).unwrap();
        assert_eq!(exported, RANDOM_SESSION_KEY);
        let pairs = blob_av_pairs(a.nt_response).unwrap();
        assert_eq!(pairs.len(), 2);
        assert_eq!(from_utf16le(pairs[1].1).unwrap(), "Server");
    }

    #[test]
    fn hostile_messages_are_errors_not_panics() {
        let msg = unhex(SPEC_AUTHENTICATE);
        for cut in 0..msg.len() {
            let _ = parse_authenticate(&msg[..cut]);
        }
        assert_eq!(
            parse_authenticate(&msg[..40]),
            Err(NtlmError::Malformed("AUTHENTICATE shorter than its header"))
        );
        // Offsets and lengths pointing anywhere.
        for at in [12usize, 20, 28, 36, 44, 52] {
            for (len, off) in [(0xffffu16, 0u32), (8, 0xffff_fff0), (2, u32::MAX), (0x10, 0x1a0)] {
                let mut m = msg.clone();
                m[at..at + 2].copy_from_slice(&len.to_le_bytes());
                m[at + 4..at + 8].copy_from_slice(&off.to_le_bytes());
                assert!(parse_authenticate(&m).is_err(), "field at {at}");
            }
        }
        let mut odd = msg.clone();
        odd[36] = 7; // UserName length 7: not UTF-16
        assert!(parse_authenticate(&odd).is_err());
        assert_eq!(
            parse_negotiate(b"NTLMSSP\0\x01\0\0\0\x01"),
            Err(NtlmError::Malformed("NEGOTIATE shorter than its flags"))
        );
        assert_eq!(parse_negotiate(b"\x60\x28\x06\x06"), Err(NtlmError::NotNtlm));
        assert_eq!(parse_negotiate(&msg), Err(NtlmError::WrongType { got: 3, want: 1 }));
        assert!(parse_av_pairs(&[2, 0, 0xff, 0xff, 1]).is_err());
        assert!(parse_av_pairs(&[2, 0, 0, 0]).is_err(), "no EOL");
        assert!(blob_av_pairs(&[0; 30]).is_err());
        assert!(!has_mic(&[]));
    }

    #[test]
    fn filetime_and_version() {
        // 1970-01-01 is 11644473600 s after 1601-01-01.
        assert_eq!(filetime(0, 0), 116_444_736_000_000_000);
        assert_eq!(filetime(1_500_000_000, 0), 116_444_736_000_000_000 + 15_000_000);
        assert_eq!(filetime(0, -900), 116_444_736_000_000_000 - 9_000_000_000);
        assert_eq!(filetime(0, i64::MIN), 0);
        assert_eq!(version(10, 0, 17763), [10, 0, 0x63, 0x45, 0, 0, 0, 0x0f]);
    }
}
