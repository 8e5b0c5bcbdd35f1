//! NTLM (MS-NLMP) as a CredSSP client needs it: the NEGOTIATE message, CHALLENGE decoding (AV
//! pairs, FILETIME, Version), the NTLMv2 AUTHENTICATE message with its MIC, the session keys and
//! the sealing (GSS_WrapEx / GSS_UnwrapEx) CredSSP binds the server's public key with.
//!
//! Pure functions and values: no sockets, no clock, no randomness (the caller passes the client
//! challenge and the random session key). Every read of a hostile message checks its length
//! first; decoding errors are values, never panics.

use std::fmt;

use hmac::{KeyInit as _, Mac as _};
use md4::Digest as _;
use rc4::{cipher::StreamCipher as _, Rc4};
use zeroize::{Zeroize, Zeroizing};

/// `NTLMSSP\0`.
pub const SIGNATURE: &[u8; 8] = b"NTLMSSP\0";

/// NegotiateFlags bits (MS-NLMP 2.2.2.5).
pub mod flags {
    /// NTLMSSP_NEGOTIATE_UNICODE (A).
    pub const UNICODE: u32 = 0x0000_0001;
    /// NTLM_NEGOTIATE_OEM (B).
    pub const OEM: u32 = 0x0000_0002;
    /// NTLMSSP_REQUEST_TARGET (C).
    pub const REQUEST_TARGET: u32 = 0x0000_0004;
    /// NTLMSSP_NEGOTIATE_SIGN (D).
    pub const SIGN: u32 = 0x0000_0010;
    /// NTLMSSP_NEGOTIATE_SEAL (E).
    pub const SEAL: u32 = 0x0000_0020;
    /// NTLMSSP_NEGOTIATE_NTLM (H).
    pub const NTLM: u32 = 0x0000_0200;
    /// NTLMSSP_NEGOTIATE_ALWAYS_SIGN (M).
    pub const ALWAYS_SIGN: u32 = 0x0000_8000;
    /// NTLMSSP_NEGOTIATE_EXTENDED_SESSIONSECURITY (P).
    pub const EXTENDED_SESSIONSECURITY: u32 = 0x0008_0000;
    /// NTLMSSP_NEGOTIATE_TARGET_INFO (S).
    pub const TARGET_INFO: u32 = 0x0080_0000;
    /// NTLMSSP_NEGOTIATE_VERSION (T).
    pub const VERSION: u32 = 0x0200_0000;
    /// NTLMSSP_NEGOTIATE_128 (U).
    pub const N128: u32 = 0x2000_0000;
    /// NTLMSSP_NEGOTIATE_KEY_EXCH (V).
    pub const KEY_EXCH: u32 = 0x4000_0000;
    /// NTLMSSP_NEGOTIATE_56 (W).
    pub const N56: u32 = 0x8000_0000;

    /// What this client asks for in its NEGOTIATE: Unicode, NTLMv2 with extended session
    /// security, 128-bit keys, key exchange, signing and sealing (CredSSP needs sealing), and
    /// the Version field.
    pub const CLIENT: u32 = UNICODE
        | REQUEST_TARGET
        | SIGN
        | SEAL
        | NTLM
        | ALWAYS_SIGN
        | EXTENDED_SESSIONSECURITY
        | VERSION
        | N128
        | KEY_EXCH
        | N56;
}

/// AV pair ids (MS-NLMP 2.2.2.1).
pub mod av {
    /// MsvAvEOL.
    pub const EOL: u16 = 0;
    /// MsvAvNbComputerName.
    pub const NB_COMPUTER_NAME: u16 = 1;
    /// MsvAvNbDomainName.
    pub const NB_DOMAIN_NAME: u16 = 2;
    /// MsvAvDnsComputerName.
    pub const DNS_COMPUTER_NAME: u16 = 3;
    /// MsvAvDnsDomainName.
    pub const DNS_DOMAIN_NAME: u16 = 4;
    /// MsvAvDnsTreeName.
    pub const DNS_TREE_NAME: u16 = 5;
    /// MsvAvFlags.
    pub const FLAGS: u16 = 6;
    /// MsvAvTimestamp (FILETIME).
    pub const TIMESTAMP: u16 = 7;
}

/// MsvAvFlags bit: the AUTHENTICATE message carries a MIC.
const AV_FLAG_MIC: u32 = 0x0000_0002;

/// The Version structure this client sends: 10.0 build 20348, NTLM revision 15.
pub const CLIENT_VERSION: Version = Version {
    major: 10,
    minor: 0,
    build: 20348,
    revision: 15,
};

/// Why an NTLM message could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NtlmError {
    /// Shorter than its fixed header.
    #[error("NTLM message truncated: {0} bytes")]
    Truncated(usize),
    /// Does not start with `NTLMSSP\0`.
    #[error("not an NTLM message (no NTLMSSP signature)")]
    NoSignature,
    /// Another message type than the one expected.
    #[error("NTLM message type {got}, expected {want}")]
    WrongType {
        /// The type found.
        got: u32,
        /// The type expected.
        want: u32,
    },
    /// A field points outside the message.
    #[error("NTLM {0} field points outside the message")]
    FieldOutOfBounds(&'static str),
    /// The AV pair list is malformed.
    #[error("malformed AV pair list: {0}")]
    AvPairs(&'static str),
    /// The server did not agree to something NTLMv2 over CredSSP needs.
    #[error("the server did not negotiate {0}")]
    Unsupported(&'static str),
    /// A sealed message failed to verify.
    #[error("sealed message {0}")]
    Unseal(&'static str),
}

/// The NTLM Version structure (MS-NLMP 2.2.2.10): the OS build of the sender.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Version {
    /// ProductMajorVersion.
    pub major: u8,
    /// ProductMinorVersion.
    pub minor: u8,
    /// ProductBuild.
    pub build: u16,
    /// NTLMRevisionCurrent (15 today).
    pub revision: u8,
}

impl Version {
    fn encode(&self) -> [u8; 8] {
        let b = self.build.to_le_bytes();
        [self.major, self.minor, b[0], b[1], 0, 0, 0, self.revision]
    }

    fn decode(b: &[u8; 8]) -> Self {
        Version {
            major: b[0],
            minor: b[1],
            build: u16::from_le_bytes([b[2], b[3]]),
            revision: b[7],
        }
    }
}

impl fmt::Display for Version {
    /// `10.0.17763`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.build)
    }
}

/// What the CHALLENGE's target info says about the server.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TargetInfo {
    /// MsvAvNbComputerName.
    pub nb_computer: String,
    /// MsvAvNbDomainName.
    pub nb_domain: String,
    /// MsvAvDnsComputerName.
    pub dns_computer: String,
    /// MsvAvDnsDomainName.
    pub dns_domain: String,
    /// MsvAvDnsTreeName.
    pub dns_tree: String,
    /// MsvAvTimestamp: 100 ns intervals since 1601-01-01 UTC.
    pub timestamp: Option<u64>,
    /// MsvAvFlags.
    pub flags: Option<u32>,
}

/// A decoded CHALLENGE_MESSAGE (MS-NLMP 2.2.1.2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Challenge {
    /// NegotiateFlags.
    pub flags: u32,
    /// ServerChallenge.
    pub server_challenge: [u8; 8],
    /// TargetName, decoded (UTF-16LE when the Unicode flag is set, else Latin-1).
    pub target_name: String,
    /// TargetInfo as sent (the NTLMv2 response embeds it).
    pub target_info_raw: Vec<u8>,
    /// TargetInfo, decoded.
    pub target_info: TargetInfo,
    /// Version, when NTLMSSP_NEGOTIATE_VERSION is set.
    pub version: Option<Version>,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    b.get(at..at.checked_add(2)?).map(|s| u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at.checked_add(4)?)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// A (Len, MaxLen, BufferOffset) field's bytes, bounds-checked.
fn field<'a>(b: &'a [u8], at: usize, name: &'static str) -> Result<&'a [u8], NtlmError> {
    let len = u16_at(b, at).ok_or(NtlmError::Truncated(b.len()))? as usize;
    let off = u32_at(b, at + 4).ok_or(NtlmError::Truncated(b.len()))? as usize;
    if len == 0 {
        return Ok(&[]);
    }
    off.checked_add(len)
        .and_then(|end| b.get(off..end))
        .ok_or(NtlmError::FieldOutOfBounds(name))
}

/// UTF-16LE to a string (lossy; an odd trailing byte is dropped).
pub fn from_utf16le(b: &[u8]) -> String {
    let units: Vec<u16> = b.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
    String::from_utf16_lossy(&units)
}

/// A string as UTF-16LE.
pub fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

/// Splits an AV pair list into (id, value) pairs, up to MsvAvEOL.
pub fn av_pairs(b: &[u8]) -> Result<Vec<(u16, &[u8])>, NtlmError> {
    let mut out = Vec::new();
    let mut at = 0usize;
    loop {
        let id = u16_at(b, at).ok_or(NtlmError::AvPairs("list ends without MsvAvEOL"))?;
        let len = u16_at(b, at + 2).ok_or(NtlmError::AvPairs("truncated pair header"))? as usize;
        let start = at + 4;
        let value = b
            .get(start..start + len)
            .ok_or(NtlmError::AvPairs("pair longer than the list"))?;
        if id == av::EOL {
            return Ok(out);
        }
        out.push((id, value));
        at = start + len;
    }
}

/// Decodes a target info list.
pub fn decode_target_info(b: &[u8]) -> Result<TargetInfo, NtlmError> {
    let mut t = TargetInfo::default();
    for (id, v) in av_pairs(b)? {
        match id {
            av::NB_COMPUTER_NAME => t.nb_computer = from_utf16le(v),
            av::NB_DOMAIN_NAME => t.nb_domain = from_utf16le(v),
            av::DNS_COMPUTER_NAME => t.dns_computer = from_utf16le(v),
            av::DNS_DOMAIN_NAME => t.dns_domain = from_utf16le(v),
            av::DNS_TREE_NAME => t.dns_tree = from_utf16le(v),
            av::FLAGS => t.flags = v.try_into().ok().map(u32::from_le_bytes),
            av::TIMESTAMP => t.timestamp = v.try_into().ok().map(u64::from_le_bytes),
            _ => {}
        }
    }
    Ok(t)
}

fn check_header(b: &[u8], want: u32, min: usize) -> Result<(), NtlmError> {
    if b.len() < 12 {
        return Err(NtlmError::Truncated(b.len()));
    }
    if &b[..8] != SIGNATURE {
        return Err(NtlmError::NoSignature);
    }
    let got = u32_at(b, 8).ok_or(NtlmError::Truncated(b.len()))?;
    if got != want {
        return Err(NtlmError::WrongType { got, want });
    }
    if b.len() < min {
        return Err(NtlmError::Truncated(b.len()));
    }
    Ok(())
}

/// The NEGOTIATE_MESSAGE (MS-NLMP 2.2.1.1): no domain, no workstation, a Version.
pub fn negotiate_message(flags: u32) -> Vec<u8> {
    let mut m = Vec::with_capacity(40);
    m.extend_from_slice(SIGNATURE);
    m.extend_from_slice(&1u32.to_le_bytes());
    m.extend_from_slice(&flags.to_le_bytes());
    // DomainNameFields, WorkstationFields: empty, offset at the end of the header.
    for _ in 0..2 {
        m.extend_from_slice(&0u16.to_le_bytes());
        m.extend_from_slice(&0u16.to_le_bytes());
        m.extend_from_slice(&40u32.to_le_bytes());
    }
    m.extend_from_slice(&CLIENT_VERSION.encode());
    m
}

/// Decodes a CHALLENGE_MESSAGE.
pub fn decode_challenge(b: &[u8]) -> Result<Challenge, NtlmError> {
    // Signature, type, TargetNameFields, flags, challenge, reserved, TargetInfoFields.
    check_header(b, 2, 48)?;
    let flags = u32_at(b, 20).ok_or(NtlmError::Truncated(b.len()))?;
    let mut server_challenge = [0u8; 8];
    server_challenge.copy_from_slice(&b[24..32]);
    let name = field(b, 12, "TargetName")?;
    let target_name = if flags & flags::UNICODE != 0 {
        from_utf16le(name)
    } else {
        name.iter().map(|&c| char::from(c)).collect()
    };
    let info = field(b, 40, "TargetInfo")?;
    let target_info = if info.is_empty() {
        TargetInfo::default()
    } else {
        decode_target_info(info)?
    };
    let version = if flags & flags::VERSION != 0 {
        b.get(48..56)
            .and_then(|v| <&[u8; 8]>::try_from(v).ok())
            .map(Version::decode)
    } else {
        None
    };
    Ok(Challenge {
        flags,
        server_challenge,
        target_name,
        target_info_raw: info.to_vec(),
        target_info,
        version,
    })
}

type HmacMd5 = hmac::Hmac<md5::Md5>;

fn hmac_md5(key: &[u8], parts: &[&[u8]]) -> [u8; 16] {
    #[allow(clippy::expect_used)]
    let mut mac = HmacMd5::new_from_slice(key).expect("HMAC accepts keys of any length");
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

fn md5(parts: &[&[u8]]) -> [u8; 16] {
    let mut h = md5::Md5::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// RC4 with a 16-byte key over `data`, in place.
fn rc4_16(key: &[u8; 16], data: &mut [u8]) {
    rc4_handle(key).apply_keystream(data);
}

/// An RC4 handle keyed with 16 bytes.
fn rc4_handle(key: &[u8; 16]) -> Rc4 {
    #[allow(clippy::expect_used)]
    Rc4::new_from_slice(key).expect("RC4 accepts 1- to 256-byte keys")
}

/// NTOWFv1: MD4 of the UTF-16LE password (the "NT hash"). The UTF-16 copy is wiped.
pub fn nt_hash(password: &str) -> Zeroizing<[u8; 16]> {
    let mut pw = Zeroizing::new(utf16le(password));
    let mut h = md4::Md4::new();
    h.update(&pw[..]);
    pw.zeroize();
    Zeroizing::new(h.finalize().into())
}

/// NTOWFv2 = HMAC_MD5(NT hash, UNICODE(Uppercase(User) ‖ UserDom)) (MS-NLMP 3.3.2).
pub fn ntowf_v2(nt_hash: &[u8; 16], user: &str, domain: &str) -> Zeroizing<[u8; 16]> {
    let ident = utf16le(&format!("{}{domain}", user.to_uppercase()));
    Zeroizing::new(hmac_md5(nt_hash, &[&ident]))
}

/// The NTLMv2 `temp` blob: 01 01 Z(6) Time ClientChallenge Z(4) ServerName Z(4).
pub fn ntlmv2_temp(timestamp: u64, client_challenge: &[u8; 8], target_info: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(32 + target_info.len());
    t.extend_from_slice(&[1, 1, 0, 0, 0, 0, 0, 0]);
    t.extend_from_slice(&timestamp.to_le_bytes());
    t.extend_from_slice(client_challenge);
    t.extend_from_slice(&[0; 4]);
    t.extend_from_slice(target_info);
    t.extend_from_slice(&[0; 4]);
    t
}

/// NTProofStr = HMAC_MD5(ResponseKeyNT, ServerChallenge ‖ temp).
pub fn nt_proof_str(response_key: &[u8; 16], server_challenge: &[u8; 8], temp: &[u8]) -> [u8; 16] {
    hmac_md5(response_key, &[server_challenge, temp])
}

/// SessionBaseKey = HMAC_MD5(ResponseKeyNT, NTProofStr); for NTLMv2 it is also the
/// KeyExchangeKey.
pub fn session_base_key(response_key: &[u8; 16], nt_proof: &[u8; 16]) -> Zeroizing<[u8; 16]> {
    Zeroizing::new(hmac_md5(response_key, &[nt_proof]))
}

/// LMv2 response: HMAC_MD5(ResponseKeyLM, ServerChallenge ‖ ClientChallenge) ‖ ClientChallenge.
pub fn lmv2_response(response_key: &[u8; 16], server_challenge: &[u8; 8], client_challenge: &[u8; 8]) -> [u8; 24] {
    let mut out = [0u8; 24];
    out[..16].copy_from_slice(&hmac_md5(response_key, &[server_challenge, client_challenge]));
    out[16..].copy_from_slice(client_challenge);
    out
}

/// RC4K(KeyExchangeKey, ExportedSessionKey): the EncryptedRandomSessionKey.
pub fn encrypt_session_key(key_exchange_key: &[u8; 16], exported: &[u8; 16]) -> [u8; 16] {
    let mut out = *exported;
    rc4_16(key_exchange_key, &mut out);
    out
}

/// Which side's keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Client to server.
    ClientToServer,
    /// Server to client.
    ServerToClient,
}

/// SIGNKEY with extended session security (MS-NLMP 3.4.5.2).
pub fn sign_key(exported: &[u8; 16], dir: Direction) -> Zeroizing<[u8; 16]> {
    let magic: &[u8] = match dir {
        Direction::ClientToServer => b"session key to client-to-server signing key magic constant\0",
        Direction::ServerToClient => b"session key to server-to-client signing key magic constant\0",
    };
    Zeroizing::new(md5(&[exported, magic]))
}

/// SEALKEY with extended session security (MS-NLMP 3.4.5.3): the key is cut to 7 or 5 bytes
/// before hashing when 128-bit (or 56-bit) keys were not negotiated.
pub fn seal_key(exported: &[u8; 16], negotiated: u32, dir: Direction) -> Zeroizing<[u8; 16]> {
    let magic: &[u8] = match dir {
        Direction::ClientToServer => b"session key to client-to-server sealing key magic constant\0",
        Direction::ServerToClient => b"session key to server-to-client sealing key magic constant\0",
    };
    let key: &[u8] = if negotiated & flags::N128 != 0 {
        exported
    } else if negotiated & flags::N56 != 0 {
        &exported[..7]
    } else {
        &exported[..5]
    };
    Zeroizing::new(md5(&[key, magic]))
}

/// One direction's sealing state: the signing key, the RC4 handle (its keystream runs on across
/// messages) and the sequence number.
pub struct Sealer {
    sign_key: Zeroizing<[u8; 16]>,
    rc4: Rc4,
    seq: u32,
    key_exch: bool,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer").field("seq", &self.seq).finish_non_exhaustive()
    }
}

impl Sealer {
    /// The state for one direction, from the ExportedSessionKey and the negotiated flags.
    pub fn new(exported: &[u8; 16], negotiated: u32, dir: Direction) -> Self {
        let seal = seal_key(exported, negotiated, dir);
        Sealer {
            sign_key: sign_key(exported, dir),
            rc4: rc4_handle(&seal),
            seq: 0,
            key_exch: negotiated & flags::KEY_EXCH != 0,
        }
    }

    /// The sequence number the next message will carry.
    pub fn seq(&self) -> u32 {
        self.seq
    }

    fn checksum(&mut self, plain: &[u8]) -> [u8; 8] {
        let mac = hmac_md5(&self.sign_key[..], &[&self.seq.to_le_bytes(), plain]);
        let mut c = [0u8; 8];
        c.copy_from_slice(&mac[..8]);
        if self.key_exch {
            self.rc4.apply_keystream(&mut c);
        }
        c
    }

    /// GSS_WrapEx: the 16-byte signature followed by the encrypted message (the layout CredSSP
    /// puts in pubKeyAuth). The message is encrypted first, then the checksum, with one handle.
    pub fn seal(&mut self, plain: &[u8]) -> Vec<u8> {
        let mut data = plain.to_vec();
        self.rc4.apply_keystream(&mut data);
        let checksum = self.checksum(plain);
        let mut out = Vec::with_capacity(16 + data.len());
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&checksum);
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&data);
        self.seq = self.seq.wrapping_add(1);
        out
    }

    /// GSS_UnwrapEx of a signature-then-data token; checks the signature.
    pub fn unseal(&mut self, token: &[u8]) -> Result<Vec<u8>, NtlmError> {
        if token.len() < 16 {
            return Err(NtlmError::Unseal("shorter than its signature"));
        }
        let (sig, data) = token.split_at(16);
        if sig[..4] != 1u32.to_le_bytes() {
            return Err(NtlmError::Unseal("has an unknown signature version"));
        }
        if sig[12..16] != self.seq.to_le_bytes() {
            return Err(NtlmError::Unseal("carries an unexpected sequence number"));
        }
        let mut plain = data.to_vec();
        self.rc4.apply_keystream(&mut plain);
        let checksum = self.checksum(&plain);
        self.seq = self.seq.wrapping_add(1);
        // Not secret-dependent in a way an observer can use: the keys die with this stage.
        if checksum[..] != sig[4..12] {
            return Err(NtlmError::Unseal("fails its signature check"));
        }
        Ok(plain)
    }
}

/// Everything the AUTHENTICATE message is computed from.
pub struct AuthInput<'a> {
    /// The NEGOTIATE message as sent (the MIC covers it).
    pub negotiate: &'a [u8],
    /// The CHALLENGE message as received.
    pub challenge_raw: &'a [u8],
    /// The CHALLENGE, decoded.
    pub challenge: &'a Challenge,
    /// UserName.
    pub user: &'a str,
    /// DomainName (may be empty).
    pub domain: &'a str,
    /// Workstation (may be empty).
    pub workstation: &'a str,
    /// MD4 of the password.
    pub nt_hash: &'a [u8; 16],
    /// ChallengeFromClient (random).
    pub client_challenge: [u8; 8],
    /// The random session key (ExportedSessionKey when KEY_EXCH is negotiated).
    pub random_session_key: [u8; 16],
    /// Our clock as FILETIME, used only when the CHALLENGE carries no MsvAvTimestamp.
    pub now_filetime: u64,
}

/// The AUTHENTICATE message and the sealing state it establishes.
pub struct Authenticated {
    /// AUTHENTICATE_MESSAGE bytes.
    pub message: Vec<u8>,
    /// Seals what the client sends.
    pub client: Sealer,
    /// Unseals what the server sends.
    pub server: Sealer,
    /// The flags both sides agreed on.
    pub negotiated: u32,
    /// Whether a MIC was included.
    pub with_mic: bool,
}

impl fmt::Debug for Authenticated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticated")
            .field("negotiated", &format_args!("0x{:08x}", self.negotiated))
            .field("with_mic", &self.with_mic)
            .finish_non_exhaustive()
    }
}

/// The target info the client echoes in its NTLMv2 response: the server's pairs, with
/// MsvAvFlags' MIC bit set when `mic` (MS-NLMP 3.1.5.1.2).
fn client_target_info(raw: &[u8], mic: bool) -> Result<Vec<u8>, NtlmError> {
    if !mic {
        return Ok(raw.to_vec());
    }
    let mut out = Vec::with_capacity(raw.len() + 8);
    let mut flags_seen = false;
    for (id, v) in av_pairs(raw)? {
        let value: Vec<u8> = if id == av::FLAGS {
            flags_seen = true;
            let f = <[u8; 4]>::try_from(v).map_or(0, u32::from_le_bytes) | AV_FLAG_MIC;
            f.to_le_bytes().to_vec()
        } else {
            v.to_vec()
        };
        out.extend_from_slice(&id.to_le_bytes());
        out.extend_from_slice(&(value.len() as u16).to_le_bytes());
        out.extend_from_slice(&value);
    }
    if !flags_seen {
        out.extend_from_slice(&av::FLAGS.to_le_bytes());
        out.extend_from_slice(&4u16.to_le_bytes());
        out.extend_from_slice(&AV_FLAG_MIC.to_le_bytes());
    }
    out.extend_from_slice(&[0, 0, 0, 0]);
    Ok(out)
}

/// Builds the NTLMv2 AUTHENTICATE_MESSAGE (MS-NLMP 2.2.1.3, 3.1.5.1.2) with Version and, when
/// the server sent a timestamp, a MIC; derives the sealing keys.
pub fn authenticate(inp: &AuthInput<'_>) -> Result<Authenticated, NtlmError> {
    let ch = inp.challenge;
    if ch.flags & flags::EXTENDED_SESSIONSECURITY == 0 {
        return Err(NtlmError::Unsupported(
            "extended session security (NTLMv2 session keys)",
        ));
    }
    if ch.flags & flags::UNICODE == 0 {
        return Err(NtlmError::Unsupported("Unicode strings"));
    }
    if ch.target_info_raw.is_empty() {
        return Err(NtlmError::Unsupported("target info (needed by NTLMv2)"));
    }
    // What both sides support, as the AUTHENTICATE of MS-NLMP 4.2.4.3 states it. VERSION is
    // always claimed because the Version field is always there: a server that reads the MIC
    // after the Version only when the flag is set then finds it at offset 72.
    let negotiated =
        (ch.flags & (flags::CLIENT | flags::TARGET_INFO)) | flags::UNICODE | flags::REQUEST_TARGET | flags::VERSION;
    let with_mic = ch.target_info.timestamp.is_some();
    let time = ch.target_info.timestamp.unwrap_or(inp.now_filetime);
    let info = client_target_info(&ch.target_info_raw, with_mic)?;

    let response_key = ntowf_v2(inp.nt_hash, inp.user, inp.domain);
    let temp = ntlmv2_temp(time, &inp.client_challenge, &info);
    let proof = nt_proof_str(&response_key, &ch.server_challenge, &temp);
    let mut nt_response = Vec::with_capacity(16 + temp.len());
    nt_response.extend_from_slice(&proof);
    nt_response.extend_from_slice(&temp);
    // With a server timestamp the LM response is Z(24) (MS-NLMP 3.1.5.1.2).
    let lm_response = if with_mic {
        [0u8; 24]
    } else {
        lmv2_response(&response_key, &ch.server_challenge, &inp.client_challenge)
    };
    let key_exchange_key = session_base_key(&response_key, &proof);
    let (exported, encrypted_key): (Zeroizing<[u8; 16]>, Vec<u8>) = if negotiated & flags::KEY_EXCH != 0 {
        (
            Zeroizing::new(inp.random_session_key),
            encrypt_session_key(&key_exchange_key, &inp.random_session_key).to_vec(),
        )
    } else {
        (key_exchange_key.clone(), Vec::new())
    };

    let domain = utf16le(inp.domain);
    let user = utf16le(inp.user);
    let workstation = utf16le(inp.workstation);
    // Header: 64 bytes of fields, Version (8), MIC (16).
    let header = 64 + 8 + if with_mic { 16 } else { 0 };
    let payloads: [&[u8]; 6] = [&domain, &user, &workstation, &lm_response, &nt_response, &encrypted_key];
    let total = header + payloads.iter().map(|p| p.len()).sum::<usize>();
    let mut m = Vec::with_capacity(total);
    m.extend_from_slice(SIGNATURE);
    m.extend_from_slice(&3u32.to_le_bytes());
    // Field order in the header: Lm, Nt, Domain, User, Workstation, EncryptedRandomSessionKey;
    // payload order: Domain, User, Workstation, Lm, Nt, key (as Windows lays it out).
    let mut offsets = [0usize; 6];
    let mut at = header;
    for (i, p) in payloads.iter().enumerate() {
        offsets[i] = at;
        at += p.len();
    }
    let fields = |i: usize| -> [u8; 8] {
        let len = payloads[i].len() as u16;
        let mut f = [0u8; 8];
        f[..2].copy_from_slice(&len.to_le_bytes());
        f[2..4].copy_from_slice(&len.to_le_bytes());
        f[4..].copy_from_slice(&(offsets[i] as u32).to_le_bytes());
        f
    };
    for i in [3, 4, 0, 1, 2, 5] {
        m.extend_from_slice(&fields(i));
    }
    m.extend_from_slice(&negotiated.to_le_bytes());
    m.extend_from_slice(&CLIENT_VERSION.encode());
    let mic_at = m.len();
    if with_mic {
        m.extend_from_slice(&[0u8; 16]);
    }
    for p in payloads {
        m.extend_from_slice(p);
    }
    if with_mic {
        let mic = hmac_md5(&exported[..], &[inp.negotiate, inp.challenge_raw, &m]);
        m[mic_at..mic_at + 16].copy_from_slice(&mic);
    }
    Ok(Authenticated {
        message: m,
        client: Sealer::new(&exported, negotiated, Direction::ClientToServer),
        server: Sealer::new(&exported, negotiated, Direction::ServerToClient),
        negotiated,
        with_mic,
    })
}

/// FILETIME (100 ns since 1601-01-01 UTC) to milliseconds since the Unix epoch.
pub fn filetime_to_unix_ms(ft: u64) -> i64 {
    (ft / 10_000) as i64 - 11_644_473_600_000
}

/// Milliseconds since the Unix epoch to FILETIME (0 before 1601).
pub fn unix_ms_to_filetime(ms: i64) -> u64 {
    u64::try_from(ms.saturating_add(11_644_473_600_000)).map_or(0, |v| v.saturating_mul(10_000))
}

#[cfg(test)]
mod tests {
    use super::*;

    // MS-NLMP 4.2.1 common values and 4.2.4 NTLMv2 results.
    const USER: &str = "User";
    const DOMAIN: &str = "Domain";
    const PASSWORD: &str = "Password";
    const SERVER_CHALLENGE: [u8; 8] = [0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef];
    const CLIENT_CHALLENGE: [u8; 8] = [0xaa; 8];
    const RANDOM_SESSION_KEY: [u8; 16] = [0x55; 16];

    fn h(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    /// MS-NLMP 4.2.4.3: the CHALLENGE_MESSAGE of the NTLMv2 example.
    fn spec_challenge() -> Vec<u8> {
        h(
            "4e544c4d53535000 02000000 0c000c00 38000000 33828ae2 0123456789abcdef 0000000000000000
           24002400 44000000 06007017 0000000f 530065007200760065007200
           02000c00 44006f006d00610069006e00 01000c00 530065007200760065007200 00000000",
        )
    }

    /// MS-NLMP 4.2.4.1.3: the AV pairs of the example.
    fn spec_target_info() -> Vec<u8> {
        h("02000c00 44006f006d00610069006e00 01000c00 530065007200760065007200 00000000")
    }

    #[test]
    fn nt_hash_and_ntowfv2_match_ms_nlmp() {
        let nt = nt_hash(PASSWORD);
        assert_eq!(nt[..], h("a4f49c406510bdcab6824ee7c30fd852")[..], "4.2.2.1.2 NTOWFv1");
        let k = ntowf_v2(&nt, USER, DOMAIN);
        assert_eq!(k[..], h("0c868a403bfd7a93a3001ef22ef02e3f")[..], "4.2.4.1.1 NTOWFv2");
        // Only the user is upper-cased.
        assert_eq!(ntowf_v2(&nt, "user", DOMAIN)[..], k[..]);
        assert_ne!(ntowf_v2(&nt, USER, "DOMAIN")[..], k[..]);
    }

    #[test]
    fn ntlmv2_response_session_key_and_lmv2_match_ms_nlmp() {
        let k = ntowf_v2(&nt_hash(PASSWORD), USER, DOMAIN);
        let temp = ntlmv2_temp(0, &CLIENT_CHALLENGE, &spec_target_info());
        assert_eq!(
            temp,
            h("0101000000000000 0000000000000000 aaaaaaaaaaaaaaaa 00000000
               02000c00 44006f006d00610069006e00 01000c00 530065007200760065007200 00000000 00000000"),
            "4.2.4.1.3 temp"
        );
        let proof = nt_proof_str(&k, &SERVER_CHALLENGE, &temp);
        assert_eq!(
            proof[..],
            h("68cd0ab851e51c96aabc927bebef6a1c")[..],
            "4.2.4.2.2 NTProofStr"
        );
        let sbk = session_base_key(&k, &proof);
        assert_eq!(
            sbk[..],
            h("8de40ccadbc14a82f15cb0ad0de95ca3")[..],
            "4.2.4.1.2 SessionBaseKey"
        );
        assert_eq!(
            lmv2_response(&k, &SERVER_CHALLENGE, &CLIENT_CHALLENGE)[..],
            h("86c35097ac9cec102554764a57cccc19 aaaaaaaaaaaaaaaa")[..],
            "4.2.4.2.1 LMv2"
        );
        assert_eq!(
            encrypt_session_key(&sbk, &RANDOM_SESSION_KEY)[..],
            h("c5dad2544fc9799094ce1ce90bc9d03e")[..],
            "4.2.4.2.3 EncryptedRandomSessionKey"
        );
    }

    #[test]
    fn sign_seal_keys_and_wrap_match_ms_nlmp() {
        let f = flags::CLIENT;
        assert_eq!(
            sign_key(&RANDOM_SESSION_KEY, Direction::ClientToServer)[..],
            h("4788dc861b4782f35d43fd98fe1a2d39")[..]
        );
        assert_eq!(
            seal_key(&RANDOM_SESSION_KEY, f, Direction::ClientToServer)[..],
            h("59f600973cc4960a25480a7c196e4c58")[..]
        );
        assert_ne!(
            seal_key(&RANDOM_SESSION_KEY, f, Direction::ServerToClient)[..],
            seal_key(&RANDOM_SESSION_KEY, f, Direction::ClientToServer)[..]
        );
        // 4.2.4.4 GSS_WrapEx of "Plaintext".
        let mut s = Sealer::new(&RANDOM_SESSION_KEY, f, Direction::ClientToServer);
        let token = s.seal(&utf16le("Plaintext"));
        assert_eq!(token[..16], h("01000000 7fb38ec5c55d4976 00000000")[..], "signature");
        assert_eq!(
            token[16..],
            h("54e50165bf1936dc996020c1811b0f06fb5f")[..],
            "sealed data"
        );
        assert_eq!(s.seq(), 1);
        // The peer's unseal with the same direction's keys recovers it; a flipped bit fails.
        let mut peer = Sealer::new(&RANDOM_SESSION_KEY, f, Direction::ClientToServer);
        assert_eq!(peer.unseal(&token).expect("unseal"), utf16le("Plaintext"));
        let mut bad = token.clone();
        bad[20] ^= 1;
        let mut peer = Sealer::new(&RANDOM_SESSION_KEY, f, Direction::ClientToServer);
        assert!(peer.unseal(&bad).is_err());
        let mut peer = Sealer::new(&RANDOM_SESSION_KEY, f, Direction::ClientToServer);
        assert!(peer.unseal(&token[..10]).is_err());
    }

    #[test]
    fn spec_challenge_decodes() {
        let c = decode_challenge(&spec_challenge()).expect("decode");
        assert_eq!(c.flags, 0xe28a_8233);
        assert_eq!(c.server_challenge, SERVER_CHALLENGE);
        assert_eq!(c.target_name, "Server");
        assert_eq!(c.target_info_raw, spec_target_info());
        assert_eq!(c.target_info.nb_computer, "Server");
        assert_eq!(c.target_info.nb_domain, "Domain");
        assert_eq!(c.target_info.timestamp, None);
        assert_eq!(c.version.map(|v| v.to_string()), Some("6.0.6000".into()));
    }

    /// A CHALLENGE as Windows Server 2019 sends it, hand-written: DNS names and a timestamp.
    fn windows_like_challenge() -> Vec<u8> {
        let name = utf16le("EXAMPLE");
        let pair = |id: u16, v: &[u8]| {
            let mut p = id.to_le_bytes().to_vec();
            p.extend_from_slice(&(v.len() as u16).to_le_bytes());
            p.extend_from_slice(v);
            p
        };
        let mut info = Vec::new();
        info.extend(pair(av::NB_DOMAIN_NAME, &utf16le("EXAMPLE"))); // 02 00 0e 00 "EXAMPLE"
        info.extend(pair(av::NB_COMPUTER_NAME, &utf16le("RDS01"))); // 01 00 0a 00 "RDS01"
        info.extend(pair(av::DNS_DOMAIN_NAME, &utf16le("example.test"))); // 04 00 18 00
        info.extend(pair(av::DNS_COMPUTER_NAME, &utf16le("rds01.example.test"))); // 03 00 24 00
        info.extend(pair(av::DNS_TREE_NAME, &utf16le("example.test"))); // 05 00 18 00
                                                                        // MsvAvTimestamp: 2024-01-01T00:00:00Z = 133_485_408_000_000_000 (100 ns since 1601).
        info.extend(pair(av::TIMESTAMP, &133_485_408_000_000_000u64.to_le_bytes()));
        info.extend(pair(av::EOL, &[])); // 00 00 00 00
        let mut m = Vec::new();
        m.extend_from_slice(SIGNATURE); // "NTLMSSP\0"
        m.extend_from_slice(&2u32.to_le_bytes()); // MessageType CHALLENGE
        m.extend_from_slice(&(name.len() as u16).to_le_bytes()); // TargetNameLen
        m.extend_from_slice(&(name.len() as u16).to_le_bytes()); // TargetNameMaxLen
        m.extend_from_slice(&56u32.to_le_bytes()); // TargetNameBufferOffset
        m.extend_from_slice(&0xe28a_8235u32.to_le_bytes()); // NegotiateFlags (with VERSION)
        m.extend_from_slice(&[0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88]); // ServerChallenge
        m.extend_from_slice(&[0; 8]); // Reserved
        m.extend_from_slice(&(info.len() as u16).to_le_bytes()); // TargetInfoLen
        m.extend_from_slice(&(info.len() as u16).to_le_bytes()); // TargetInfoMaxLen
        m.extend_from_slice(&((56 + name.len()) as u32).to_le_bytes()); // TargetInfoBufferOffset
        m.extend_from_slice(&[10, 0, 0x63, 0x45, 0, 0, 0, 15]); // Version 10.0.17763, rev 15
        m.extend_from_slice(&name);
        m.extend_from_slice(&info);
        m
    }

    #[test]
    fn windows_like_challenge_decodes_names_version_and_filetime() {
        let c = decode_challenge(&windows_like_challenge()).expect("decode");
        assert_eq!(c.target_name, "EXAMPLE");
        let t = &c.target_info;
        assert_eq!(t.nb_computer, "RDS01");
        assert_eq!(t.nb_domain, "EXAMPLE");
        assert_eq!(t.dns_computer, "rds01.example.test");
        assert_eq!(t.dns_domain, "example.test");
        assert_eq!(t.dns_tree, "example.test");
        assert_eq!(c.version.map(|v| v.to_string()), Some("10.0.17763".into()));
        let ms = filetime_to_unix_ms(t.timestamp.expect("timestamp"));
        assert_eq!(ms, 1_704_067_200_000, "2024-01-01T00:00:00Z");
        assert_eq!(unix_ms_to_filetime(ms), 133_485_408_000_000_000);
    }

    #[test]
    fn truncated_or_hostile_challenges_are_errors() {
        let full = windows_like_challenge();
        for n in 0..full.len() {
            assert!(decode_challenge(&full[..n]).is_err(), "prefix {n} parsed");
        }
        let mut m = full.clone();
        m[40] = 0xff; // TargetInfoLen beyond the message
        m[41] = 0xff;
        assert!(matches!(decode_challenge(&m), Err(NtlmError::FieldOutOfBounds(_))));
        let mut m = full.clone();
        m[44..48].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_challenge(&m).is_err());
        let mut m = full.clone();
        m[8] = 3;
        assert_eq!(decode_challenge(&m), Err(NtlmError::WrongType { got: 3, want: 2 }));
        assert_eq!(
            decode_challenge(b"HTTP/1.1 400 Bad Request"),
            Err(NtlmError::NoSignature)
        );
        for byte in 0..full.len() {
            for bit in 0..8 {
                let mut m = full.clone();
                m[byte] ^= 1 << bit;
                let _ = decode_challenge(&m);
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn decoding_hostile_bytes_never_panics(tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            // A valid header followed by anything: exercises the field and AV pair bounds.
            let mut m = windows_like_challenge()[..56].to_vec();
            m.extend_from_slice(&tail);
            let _ = decode_challenge(&m);
            let _ = decode_challenge(&tail);
            let _ = decode_target_info(&tail);
        }
    }

    #[test]
    fn negotiate_message_layout() {
        let m = negotiate_message(flags::CLIENT);
        assert_eq!(m.len(), 40);
        assert_eq!(&m[..8], SIGNATURE);
        assert_eq!(u32_at(&m, 8), Some(1));
        assert_eq!(u32_at(&m, 12), Some(0xe208_8235));
        assert_eq!(&m[32..], &[10, 0, 0x7c, 0x4f, 0, 0, 0, 15]);
    }

    #[test]
    fn authenticate_without_timestamp_matches_the_spec_payloads() {
        let raw = spec_challenge();
        let c = decode_challenge(&raw).expect("decode");
        let nt = nt_hash(PASSWORD);
        let a = authenticate(&AuthInput {
            negotiate: &negotiate_message(flags::CLIENT),
            challenge_raw: &raw,
            challenge: &c,
            user: USER,
            domain: DOMAIN,
            workstation: "COMPUTER",
            nt_hash: &nt,
            client_challenge: CLIENT_CHALLENGE,
            random_session_key: RANDOM_SESSION_KEY,
            now_filetime: 0,
        })
        .expect("authenticate");
        assert!(!a.with_mic);
        let m = &a.message;
        // MS-NLMP 4.2.4.3 negotiates 0xe2888235 from the example's challenge flags.
        assert_eq!(a.negotiated, 0xe288_8235);
        assert_eq!(
            field(m, 12, "lm").expect("lm"),
            &h("86c35097ac9cec102554764a57cccc19 aaaaaaaaaaaaaaaa")[..]
        );
        let ntr = field(m, 20, "nt").expect("nt");
        assert_eq!(ntr.len(), 84);
        assert_eq!(&ntr[..16], &h("68cd0ab851e51c96aabc927bebef6a1c")[..]);
        assert_eq!(field(m, 28, "domain").expect("d"), &utf16le(DOMAIN)[..]);
        assert_eq!(field(m, 36, "user").expect("u"), &utf16le(USER)[..]);
        assert_eq!(field(m, 44, "ws").expect("w"), &utf16le("COMPUTER")[..]);
        assert_eq!(
            field(m, 52, "key").expect("k"),
            &h("c5dad2544fc9799094ce1ce90bc9d03e")[..]
        );
    }

    #[test]
    fn authenticate_with_timestamp_carries_a_mic_and_the_mic_flag() {
        let raw = windows_like_challenge();
        let c = decode_challenge(&raw).expect("decode");
        let neg = negotiate_message(flags::CLIENT);
        let nt = nt_hash(PASSWORD);
        let a = authenticate(&AuthInput {
            negotiate: &neg,
            challenge_raw: &raw,
            challenge: &c,
            user: USER,
            domain: DOMAIN,
            workstation: "",
            nt_hash: &nt,
            client_challenge: CLIENT_CHALLENGE,
            random_session_key: RANDOM_SESSION_KEY,
            now_filetime: 1,
        })
        .expect("authenticate");
        assert!(a.with_mic);
        let m = a.message.clone();
        assert_eq!(field(&m, 12, "lm").expect("lm"), &[0u8; 24][..]);
        // The echoed target info has MsvAvFlags = MIC and the server's timestamp.
        let ntr = field(&m, 20, "nt").expect("nt");
        let info = &ntr[16 + 28..ntr.len() - 4];
        let t = decode_target_info(info).expect("info");
        assert_eq!(t.flags, Some(AV_FLAG_MIC));
        assert_eq!(t.timestamp, c.target_info.timestamp);
        assert_eq!(
            &ntr[24..32],
            &c.target_info.timestamp.map(u64::to_le_bytes).expect("ts")[..]
        );
        // The MIC verifies over NEGOTIATE ‖ CHALLENGE ‖ AUTHENTICATE with the MIC zeroed.
        let mut zeroed = m.clone();
        zeroed[72..88].fill(0);
        assert_eq!(m[72..88], hmac_md5(&RANDOM_SESSION_KEY, &[&neg, &raw, &zeroed])[..]);
    }

    #[test]
    fn authenticate_refuses_servers_without_ess() {
        let raw = spec_challenge();
        let mut c = decode_challenge(&raw).expect("decode");
        c.flags &= !flags::EXTENDED_SESSIONSECURITY;
        let nt = nt_hash(PASSWORD);
        let r = authenticate(&AuthInput {
            negotiate: &[],
            challenge_raw: &raw,
            challenge: &c,
            user: USER,
            domain: DOMAIN,
            workstation: "",
            nt_hash: &nt,
            client_challenge: CLIENT_CHALLENGE,
            random_session_key: RANDOM_SESSION_KEY,
            now_filetime: 0,
        });
        assert!(matches!(r, Err(NtlmError::Unsupported(_))));
    }
}
