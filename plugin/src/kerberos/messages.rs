//! Kerberos AS messages, sans I/O: build the AS-REQ (without and with PA-ENC-TIMESTAMP), read
//! the KDC's answer (AS-REP, or KRB-ERROR with its code, the KDC's time, the salt of
//! PA-ETYPE-INFO2 and the NTSTATUS that AD puts in e-data). `picky-krb` supplies the message
//! types and the AES string-to-key and encryption; time and randomness are the caller's.

use picky_asn1::{
    date::Date,
    restricted_string::Ia5String,
    wrapper::{
        Asn1SequenceOf, ExplicitContextTag0, ExplicitContextTag1, ExplicitContextTag2, ExplicitContextTag3,
        ExplicitContextTag4, ExplicitContextTag5, ExplicitContextTag6, ExplicitContextTag7, ExplicitContextTag8,
        GeneralStringAsn1, GeneralizedTimeAsn1, IntegerAsn1, OctetStringAsn1, Optional,
    },
};
use picky_krb::{
    crypto::{ChecksumSuite, CipherSuite},
    data_types::{
        Authenticator, AuthenticatorInner, Checksum, EncApRepPart, EncryptedData, EncryptionKey, EtypeInfo2,
        KerberosFlags, PaData, PaEncTsEnc, PrincipalName, Ticket,
    },
    messages::{
        ApRep, ApReq, ApReqInner, AsRep, AsReq, EncAsRepPart, EncKdcRepPart, EncTgsRepPart, KdcReq, KdcReqBody,
        KrbError, TgsRep, TgsReq,
    },
};

/// etypes asked for, strongest first (AES only: RC4 and DES are refused by hardened domains).
pub const ETYPES: [u8; 2] = [18, 17];

/// padata types.
pub const PA_ENC_TIMESTAMP: u8 = 2;
/// PA-PW-SALT: Samba up to 4.18 puts the NTSTATUS here (12 bytes: status LE, 0, flags).
pub const PA_PW_SALT: u8 = 3;
/// PA-ETYPE-INFO2.
pub const PA_ETYPE_INFO2: u8 = 19;

/// A time in the messages: seconds since the Unix epoch.
pub type UnixSecs = i64;

/// A message could not be built or read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KrbMsgError {
    /// A name with characters Kerberos strings cannot carry.
    #[error("not an IA5 string: {0:?}")]
    NotIa5(String),
    /// Our encoder or the crypto library failed (never the KDC's doing).
    #[error("internal: {0}")]
    Internal(String),
    /// The KDC's bytes are not an AS-REP or a KRB-ERROR.
    #[error("the KDC's answer is not Kerberos: {0}")]
    Malformed(String),
}

fn kstr(s: &str) -> Result<GeneralStringAsn1, KrbMsgError> {
    Ia5String::from_string(s.to_owned())
        .map(GeneralStringAsn1::from)
        .map_err(|_| KrbMsgError::NotIa5(s.to_owned()))
}

fn time(t: UnixSecs) -> Result<GeneralizedTimeAsn1, KrbMsgError> {
    let dt = time::OffsetDateTime::from_unix_timestamp(t).map_err(|e| KrbMsgError::Internal(e.to_string()))?;
    let d = Date::new(
        u16::try_from(dt.year()).map_err(|e| KrbMsgError::Internal(e.to_string()))?,
        u8::from(dt.month()),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second(),
    )
    .ok_or_else(|| KrbMsgError::Internal("date out of range".into()))?;
    Ok(GeneralizedTimeAsn1::from(d))
}

fn int(v: u32) -> IntegerAsn1 {
    IntegerAsn1::from_bytes_be_unsigned(v.to_be_bytes().to_vec())
}

fn principal(kind: u8, parts: &[&str]) -> Result<PrincipalName, KrbMsgError> {
    Ok(PrincipalName {
        name_type: ExplicitContextTag0::from(IntegerAsn1::from(vec![kind])),
        name_string: ExplicitContextTag1::from(Asn1SequenceOf::from(
            parts.iter().map(|p| kstr(p)).collect::<Result<Vec<_>, _>>()?,
        )),
    })
}

/// What an AS-REQ asks for.
#[derive(Clone, Debug)]
pub struct AsReqInput<'a> {
    /// The user (sAMAccountName or the part of a UPN before `@`).
    pub user: &'a str,
    /// The realm, upper case.
    pub realm: &'a str,
    /// Nonce, at most 0x7FFFFFFF (Windows rejects larger ones intermittently).
    pub nonce: u32,
    /// Our clock.
    pub now: UnixSecs,
}

/// KDC-REQ-BODY: for an AS-REQ forwardable, renewable and canonicalize; for a TGS-REQ
/// canonicalize only (renewable or forwardable on a TGT that is not is KDC_ERR_BADOPTION); a
/// ticket for ten hours; AES etypes.
fn req_body(
    input: &AsReqInput<'_>,
    cname: Option<PrincipalName>,
    sname: PrincipalName,
) -> Result<KdcReqBody, KrbMsgError> {
    // forwardable (1), renewable (8), canonicalize (15)
    let mut flags = picky_asn1::bit_string::BitString::with_len(32);
    let bits: &[usize] = if cname.is_some() { &[1, 8, 15] } else { &[15] };
    for bit in bits {
        flags.set(*bit, true);
    }
    Ok(KdcReqBody {
        kdc_options: ExplicitContextTag0::from(KerberosFlags::from(flags)),
        cname: Optional::from(cname.map(ExplicitContextTag1::from)),
        realm: ExplicitContextTag2::from(kstr(input.realm)?),
        sname: Optional::from(Some(ExplicitContextTag3::from(sname))),
        from: Optional::from(None),
        till: ExplicitContextTag5::from(time(input.now + 10 * 3600)?),
        rtime: Optional::from(None),
        nonce: ExplicitContextTag7::from(int(input.nonce & 0x7FFF_FFFF)),
        etype: ExplicitContextTag8::from(Asn1SequenceOf::from(
            ETYPES.iter().map(|e| IntegerAsn1::from(vec![*e])).collect::<Vec<_>>(),
        )),
        addresses: Optional::from(None),
        enc_authorization_data: Optional::from(None),
        additional_tickets: Optional::from(None),
    })
}

/// DER of a message we build: a failure is ours.
fn der_of<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, KrbMsgError> {
    picky_asn1_der::to_vec(v).map_err(|e| KrbMsgError::Internal(e.to_string()))
}

/// Encodes an AS-REQ for `krbtgt/REALM`; `padata` goes in as given.
pub fn as_req(input: &AsReqInput<'_>, padata: Vec<PaData>) -> Result<Vec<u8>, KrbMsgError> {
    let body = req_body(
        input,
        Some(principal(1, &[input.user])?),
        principal(2, &["krbtgt", input.realm])?,
    )?;
    let req = AsReq::from(KdcReq {
        pvno: ExplicitContextTag1::from(IntegerAsn1::from(vec![5])),
        msg_type: ExplicitContextTag2::from(IntegerAsn1::from(vec![10])),
        padata: Optional::from((!padata.is_empty()).then(|| ExplicitContextTag3::from(Asn1SequenceOf::from(padata)))),
        req_body: ExplicitContextTag4::from(body),
    });
    der_of(&req)
}

/// The suite of an etype number we asked for.
pub fn suite(etype: u8) -> Option<CipherSuite> {
    match etype {
        18 => Some(CipherSuite::Aes256CtsHmacSha196),
        17 => Some(CipherSuite::Aes128CtsHmacSha196),
        _ => None,
    }
}

/// The long-term key made from the password and the KDC's salt.
pub fn as_key(etype: u8, password: &[u8], salt: &[u8]) -> Result<Vec<u8>, KrbMsgError> {
    suite(etype)
        .ok_or_else(|| KrbMsgError::Internal(format!("etype {etype} not supported")))?
        .cipher()
        .generate_key_from_password(password, salt)
        .map_err(|e| KrbMsgError::Internal(e.to_string()))
}

/// PA-ENC-TIMESTAMP: our time, encrypted with the key made from the password and the salt.
pub fn pa_enc_timestamp(etype: u8, key: &[u8], now: UnixSecs, usec: u32) -> Result<PaData, KrbMsgError> {
    let cipher = suite(etype)
        .ok_or_else(|| KrbMsgError::Internal(format!("etype {etype} not supported")))?
        .cipher();
    let ts = PaEncTsEnc {
        patimestamp: ExplicitContextTag0::from(time(now)?),
        pausec: Optional::from(Some(ExplicitContextTag1::from(int(usec % 1_000_000)))),
    };
    let plain = der_of(&ts)?;
    let sealed = cipher
        .encrypt(key, 1, &plain)
        .map_err(|e| KrbMsgError::Internal(e.to_string()))?;
    let enc = EncryptedData {
        etype: ExplicitContextTag0::from(IntegerAsn1::from(vec![etype])),
        kvno: Optional::from(None),
        cipher: ExplicitContextTag2::from(OctetStringAsn1::from(sealed)),
    };
    let data = der_of(&enc)?;
    Ok(PaData {
        padata_type: ExplicitContextTag1::from(IntegerAsn1::from(vec![PA_ENC_TIMESTAMP])),
        padata_data: ExplicitContextTag2::from(OctetStringAsn1::from(data)),
    })
}

/// The KDC's answer, as much as the check needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AsAnswer {
    /// An AS-REP: the KDC issued a ticket.
    Rep,
    /// A KRB-ERROR.
    Error(KdcError),
}

/// A KRB-ERROR, read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KdcError {
    /// error-code.
    pub code: u32,
    /// The KDC's time (stime), seconds since the epoch.
    pub stime: Option<UnixSecs>,
    /// e-text.
    pub text: String,
    /// The NTSTATUS in e-data (PA-PW-SALT or KERB-EXT-ERROR), if any.
    pub ntstatus: Option<u32>,
    /// (etype, salt) pairs of PA-ETYPE-INFO2, in the KDC's order.
    pub etype_info: Vec<(u8, Vec<u8>)>,
}

fn integer_u32(i: &IntegerAsn1) -> u32 {
    i.as_unsigned_bytes_be()
        .iter()
        .rev()
        .take(4)
        .rev()
        .fold(0u32, |acc, b| (acc << 8) | u32::from(*b))
}

/// Reads the KDC's answer (without the 4-byte TCP length prefix).
pub fn read_answer(bytes: &[u8]) -> Result<AsAnswer, KrbMsgError> {
    match bytes.first() {
        // [APPLICATION 11] AS-REP
        Some(0x6b) => Ok(AsAnswer::Rep),
        // [APPLICATION 30] KRB-ERROR
        Some(0x7e) => {
            let e: KrbError = picky_asn1_der::from_bytes(bytes).map_err(|e| KrbMsgError::Malformed(e.to_string()))?;
            let inner = &e.0;
            let code = inner.error_code.0;
            let stime = unix(&inner.stime.0);
            let text = inner.e_text.0.as_ref().map(|t| t.0.to_string()).unwrap_or_default();
            let mut out = KdcError {
                code,
                stime,
                text,
                ..Default::default()
            };
            if let Some(data) = inner.e_data.0.as_ref().map(|d| d.0 .0.clone()) {
                read_e_data(&data, &mut out);
            }
            Ok(AsAnswer::Error(out))
        }
        Some(b) => Err(KrbMsgError::Malformed(format!("first byte 0x{b:02x}"))),
        None => Err(KrbMsgError::Malformed("empty answer".into())),
    }
}

/// e-data: METHOD-DATA (a SEQUENCE OF PA-DATA: ETYPE-INFO2, PA-PW-SALT) or KERB-ERROR-DATA
/// (data-type 3: KERB-EXT-ERROR, the NTSTATUS first, little-endian).
fn read_e_data(data: &[u8], out: &mut KdcError) {
    if let Ok(method) = picky_asn1_der::from_bytes::<Asn1SequenceOf<PaData>>(data) {
        for pa in &method.0 {
            let t = integer_u32(&pa.padata_type.0);
            let value = &pa.padata_data.0 .0;
            if t == u32::from(PA_ETYPE_INFO2) {
                if let Ok(info) = picky_asn1_der::from_bytes::<EtypeInfo2>(value) {
                    for e in &info.0 {
                        let etype = u8::try_from(integer_u32(&e.etype.0)).unwrap_or(0);
                        let salt = e.salt.0.as_ref().map(|s| s.0.as_bytes().to_vec()).unwrap_or_default();
                        out.etype_info.push((etype, salt));
                    }
                }
            } else if t == u32::from(PA_PW_SALT) && value.len() >= 4 {
                out.ntstatus = Some(u32::from_le_bytes([value[0], value[1], value[2], value[3]]));
            }
        }
        return;
    }
    // KERB-ERROR-DATA ::= SEQUENCE { data-type [1] INTEGER, data-value [2] OCTET STRING }
    if let Some(status) = kerb_ext_error(data) {
        out.ntstatus = Some(status);
    }
}

/// The NTSTATUS of a KERB-ERROR-DATA whose data-type is 3 (KERB_ERR_TYPE_EXTENDED).
fn kerb_ext_error(data: &[u8]) -> Option<u32> {
    let (tag, body, _) = der(data)?;
    if tag != 0x30 {
        return None;
    }
    let (t1, v1, rest) = der(body)?;
    let (it, iv, _) = der(v1)?;
    if t1 != 0xa1 || it != 0x02 || iv != [3] {
        return None;
    }
    let (t2, v2, _) = der(rest)?;
    let (ot, ov, _) = der(v2)?;
    if t2 != 0xa2 || ot != 0x04 || ov.len() < 4 {
        return None;
    }
    Some(u32::from_le_bytes([ov[0], ov[1], ov[2], ov[3]]))
}

/// One DER TLV: (tag, value, rest). Definite lengths up to 4 bytes only.
pub(crate) fn der(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *b.first()?;
    let first = *b.get(1)?;
    let (len, hdr) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | usize::from(*b.get(2 + i)?);
        }
        (len, 2 + n)
    };
    let end = hdr.checked_add(len)?;
    Some((tag, b.get(hdr..end)?, b.get(end..)?))
}

/// What the TGS exchange needs from the AS-REP (the TGT and its session key), and when the
/// password expires (`key-expiration`, or a last-req of type 6 / -6), if the KDC says.
#[derive(Clone, Debug)]
pub struct Tgt {
    ticket: Ticket,
    session_key: Vec<u8>,
    key_etype: u8,
    /// Seconds since the epoch.
    pub password_expires: Option<UnixSecs>,
}

fn unix(t: &GeneralizedTimeAsn1) -> Option<UnixSecs> {
    let d = &t.0;
    time::Date::from_calendar_date(i32::from(d.year()), time::Month::try_from(d.month()).ok()?, d.day())
        .ok()?
        .with_hms(d.hour(), d.minute(), d.second())
        .ok()
        .map(|t| t.assume_utc().unix_timestamp())
}

/// Reads an AS-REP: decrypts its enc-part with the long-term key (key usage 3).
pub fn read_as_rep(bytes: &[u8], as_key: &[u8]) -> Result<Tgt, KrbMsgError> {
    let rep: AsRep = picky_asn1_der::from_bytes(bytes).map_err(|e| KrbMsgError::Malformed(e.to_string()))?;
    let enc = &rep.0.enc_part.0;
    let etype = u8::try_from(integer_u32(&enc.etype.0)).unwrap_or(0);
    let cipher = suite(etype)
        .ok_or_else(|| KrbMsgError::Malformed(format!("AS-REP enc-part etype {etype}")))?
        .cipher();
    let plain = cipher
        .decrypt(as_key, 3, &enc.cipher.0 .0)
        .map_err(|e| KrbMsgError::Malformed(format!("AS-REP enc-part does not decrypt: {e}")))?;
    // Some KDCs tag it as EncTGSRepPart.
    let part: EncKdcRepPart = picky_asn1_der::from_bytes::<EncAsRepPart>(&plain)
        .map(|p| p.0)
        .or_else(|_| picky_asn1_der::from_bytes::<EncTgsRepPart>(&plain).map(|p| p.0))
        .map_err(|e| KrbMsgError::Malformed(e.to_string()))?;
    // lr-type 6: password expiration time (negative: for the principal alone).
    let from_last_req = part
        .last_req
        .0
         .0
        .iter()
        .filter(|lr| {
            let b = lr.lr_type.0.as_signed_bytes_be();
            matches!(b, [6] | [0xfa])
        })
        .filter_map(|lr| unix(&lr.lr_value.0))
        .min();
    let key_expiration = part.key_expiration.0.as_ref().and_then(|k| unix(&k.0));
    let password_expires = match (from_last_req, key_expiration) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    Ok(Tgt {
        ticket: rep.0.ticket.0.clone(),
        session_key: part.key.0.key_value.0 .0.clone(),
        key_etype: u8::try_from(integer_u32(&part.key.0.key_type.0)).unwrap_or(0),
        password_expires,
    })
}

/// A TGS-REQ for `service` (e.g. `["TERMSRV", "rdp01.example.test"]`) with the TGT: an AP-REQ
/// whose authenticator carries the checksum of the request body (key usages 6 and 7).
pub fn tgs_req(tgt: &Tgt, input: &AsReqInput<'_>, service: &[&str], usec: u32) -> Result<Vec<u8>, KrbMsgError> {
    let body = req_body(input, None, principal(2, service)?)?;
    let body_der = der_of(&body)?;
    let (ck_type, ck_suite) = match tgt.key_etype {
        18 => (16u8, ChecksumSuite::HmacSha196Aes256),
        17 => (15u8, ChecksumSuite::HmacSha196Aes128),
        e => return Err(KrbMsgError::Internal(format!("session key etype {e} not supported"))),
    };
    let cksum = ck_suite
        .hasher()
        .checksum(&tgt.session_key, 6, &body_der)
        .map_err(|e| KrbMsgError::Internal(e.to_string()))?;
    let auth = Authenticator::from(AuthenticatorInner {
        authenticator_vno: ExplicitContextTag0::from(IntegerAsn1::from(vec![5])),
        crealm: ExplicitContextTag1::from(kstr(input.realm)?),
        cname: ExplicitContextTag2::from(principal(1, &[input.user])?),
        cksum: Optional::from(Some(ExplicitContextTag3::from(Checksum {
            cksumtype: ExplicitContextTag0::from(IntegerAsn1::from(vec![ck_type])),
            checksum: ExplicitContextTag1::from(OctetStringAsn1::from(cksum)),
        }))),
        cusec: ExplicitContextTag4::from(int(usec % 1_000_000)),
        ctime: ExplicitContextTag5::from(time(input.now)?),
        subkey: Optional::from(None),
        seq_number: Optional::from(None),
        authorization_data: Optional::from(None),
    });
    let auth_der = der_of(&auth)?;
    let sealed = suite(tgt.key_etype)
        .ok_or_else(|| KrbMsgError::Internal("session key etype".into()))?
        .cipher()
        .encrypt(&tgt.session_key, 7, &auth_der)
        .map_err(|e| KrbMsgError::Internal(e.to_string()))?;
    let ap = ApReq::from(ApReqInner {
        pvno: ExplicitContextTag0::from(IntegerAsn1::from(vec![5])),
        msg_type: ExplicitContextTag1::from(IntegerAsn1::from(vec![14])),
        ap_options: ExplicitContextTag2::from(KerberosFlags::from(picky_asn1::bit_string::BitString::with_len(32))),
        ticket: ExplicitContextTag3::from(tgt.ticket.clone()),
        authenticator: ExplicitContextTag4::from(EncryptedData {
            etype: ExplicitContextTag0::from(IntegerAsn1::from(vec![tgt.key_etype])),
            kvno: Optional::from(None),
            cipher: ExplicitContextTag2::from(OctetStringAsn1::from(sealed)),
        }),
    });
    let pa = PaData {
        padata_type: ExplicitContextTag1::from(IntegerAsn1::from(vec![1])),
        padata_data: ExplicitContextTag2::from(OctetStringAsn1::from(der_of(&ap)?)),
    };
    let req = TgsReq::from(KdcReq {
        pvno: ExplicitContextTag1::from(IntegerAsn1::from(vec![5])),
        msg_type: ExplicitContextTag2::from(IntegerAsn1::from(vec![12])),
        padata: Optional::from(Some(ExplicitContextTag3::from(Asn1SequenceOf::from(vec![pa])))),
        req_body: ExplicitContextTag4::from(body),
    });
    der_of(&req)
}

/// The KDC's answer to a TGS-REQ: `None` for a TGS-REP ([APPLICATION 13]), else the KRB-ERROR.
pub fn read_tgs_answer(bytes: &[u8]) -> Result<Option<KdcError>, KrbMsgError> {
    match bytes.first() {
        Some(0x6d) => Ok(None),
        Some(0x7e) => match read_answer(bytes)? {
            AsAnswer::Error(e) => Ok(Some(e)),
            AsAnswer::Rep => Ok(None),
        },
        Some(b) => Err(KrbMsgError::Malformed(format!("first byte 0x{b:02x}"))),
        None => Err(KrbMsgError::Malformed("empty answer".into())),
    }
}

/// A ticket for a service (from a TGS-REP) and the session key it shares with that service:
/// what the NLA stage's Kerberos logon presents (AP-REQ) instead of a password.
#[derive(Clone)]
pub struct ServiceTicket {
    pub(crate) ticket: Ticket,
    pub(crate) session_key: zeroize::Zeroizing<Vec<u8>>,
    pub(crate) etype: u8,
    /// The client's realm (upper case) and name, as asked in the AS-REQ.
    pub realm: String,
    /// The client's name.
    pub user: String,
    /// The service, `TERMSRV/host@REALM`.
    pub principal: String,
}

impl std::fmt::Debug for ServiceTicket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceTicket")
            .field("principal", &self.principal)
            .field("client", &format_args!("{}@{}", self.user, self.realm))
            .field("etype", &self.etype)
            .finish_non_exhaustive()
    }
}

/// Reads a TGS-REP: the service ticket, and its session key from the enc-part decrypted with
/// the TGT's session key (key usage 8).
pub fn read_tgs_rep(bytes: &[u8], tgt: &Tgt) -> Result<(Ticket, Vec<u8>, u8), KrbMsgError> {
    let rep: TgsRep = picky_asn1_der::from_bytes(bytes).map_err(|e| KrbMsgError::Malformed(e.to_string()))?;
    let enc = &rep.0.enc_part.0;
    let etype = u8::try_from(integer_u32(&enc.etype.0)).unwrap_or(0);
    let cipher = suite(etype)
        .ok_or_else(|| KrbMsgError::Malformed(format!("TGS-REP enc-part etype {etype}")))?
        .cipher();
    let plain = cipher
        .decrypt(&tgt.session_key, 8, &enc.cipher.0 .0)
        .map_err(|e| KrbMsgError::Malformed(format!("TGS-REP enc-part does not decrypt: {e}")))?;
    let part: EncKdcRepPart = picky_asn1_der::from_bytes::<EncTgsRepPart>(&plain)
        .map(|p| p.0)
        .or_else(|_| picky_asn1_der::from_bytes::<EncAsRepPart>(&plain).map(|p| p.0))
        .map_err(|e| KrbMsgError::Malformed(e.to_string()))?;
    let key_etype = u8::try_from(integer_u32(&part.key.0.key_type.0)).unwrap_or(0);
    if suite(key_etype).is_none() {
        return Err(KrbMsgError::Malformed(format!("service session key etype {key_etype}")));
    }
    Ok((rep.0.ticket.0.clone(), part.key.0.key_value.0 .0.clone(), key_etype))
}

/// GSS checksum flags (RFC 4121 4.1.1.1) the NLA logon asks for: mutual authentication,
/// replay and sequence detection, confidentiality and integrity.
pub const GSS_FLAGS: u32 = 0x02 | 0x04 | 0x08 | 0x10 | 0x20;

/// An AP-REQ for `st` (key usage 11): mutual authentication required, the authenticator with
/// the GSS checksum (type 0x8003, no channel bindings), our `subkey` and initial sequence
/// number `seq`. `now`/`usec` come back in the AP-REP.
pub fn ap_req(st: &ServiceTicket, now: UnixSecs, usec: u32, subkey: &[u8], seq: u32) -> Result<Vec<u8>, KrbMsgError> {
    let mut gss = Vec::with_capacity(24);
    gss.extend_from_slice(&16u32.to_le_bytes());
    gss.extend_from_slice(&[0u8; 16]);
    gss.extend_from_slice(&GSS_FLAGS.to_le_bytes());
    let auth = Authenticator::from(AuthenticatorInner {
        authenticator_vno: ExplicitContextTag0::from(IntegerAsn1::from(vec![5])),
        crealm: ExplicitContextTag1::from(kstr(&st.realm)?),
        cname: ExplicitContextTag2::from(principal(1, &[st.user.as_str()])?),
        cksum: Optional::from(Some(ExplicitContextTag3::from(Checksum {
            cksumtype: ExplicitContextTag0::from(int(0x8003)),
            checksum: ExplicitContextTag1::from(OctetStringAsn1::from(gss)),
        }))),
        cusec: ExplicitContextTag4::from(int(usec % 1_000_000)),
        ctime: ExplicitContextTag5::from(time(now)?),
        subkey: Optional::from(Some(ExplicitContextTag6::from(EncryptionKey {
            key_type: ExplicitContextTag0::from(IntegerAsn1::from(vec![st.etype])),
            key_value: ExplicitContextTag1::from(OctetStringAsn1::from(subkey.to_vec())),
        }))),
        seq_number: Optional::from(Some(ExplicitContextTag7::from(int(seq)))),
        authorization_data: Optional::from(None),
    });
    let sealed = suite(st.etype)
        .ok_or_else(|| KrbMsgError::Internal("service session key etype".into()))?
        .cipher()
        .encrypt(&st.session_key, 11, &der_of(&auth)?)
        .map_err(|e| KrbMsgError::Internal(e.to_string()))?;
    // mutual-required (bit 2)
    let mut options = picky_asn1::bit_string::BitString::with_len(32);
    options.set(2, true);
    der_of(&ApReq::from(ApReqInner {
        pvno: ExplicitContextTag0::from(IntegerAsn1::from(vec![5])),
        msg_type: ExplicitContextTag1::from(IntegerAsn1::from(vec![14])),
        ap_options: ExplicitContextTag2::from(KerberosFlags::from(options)),
        ticket: ExplicitContextTag3::from(st.ticket.clone()),
        authenticator: ExplicitContextTag4::from(EncryptedData {
            etype: ExplicitContextTag0::from(IntegerAsn1::from(vec![st.etype])),
            kvno: Optional::from(None),
            cipher: ExplicitContextTag2::from(OctetStringAsn1::from(sealed)),
        }),
    }))
}

/// What the service's AP-REP says (key usage 12): our time echoed, and the acceptor's subkey
/// and sequence number when it chose them.
#[derive(Clone, PartialEq, Eq)]
pub struct ApRepPart {
    /// The authenticator's ctime, echoed.
    pub ctime: UnixSecs,
    /// The authenticator's cusec, echoed.
    pub cusec: u32,
    /// The acceptor's subkey (etype, key), if any.
    pub subkey: Option<(u8, zeroize::Zeroizing<Vec<u8>>)>,
    /// The acceptor's initial sequence number, if any.
    pub seq: Option<u32>,
}

impl std::fmt::Debug for ApRepPart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApRepPart")
            .field("ctime", &self.ctime)
            .field("cusec", &self.cusec)
            .field("subkey", &self.subkey.as_ref().map(|(e, _)| e))
            .field("seq", &self.seq)
            .finish()
    }
}

/// Reads an AP-REP from the service: decrypted with the service session key (key usage 12).
/// A part that does not decrypt is the mutual authentication failing.
pub fn read_ap_rep(bytes: &[u8], st: &ServiceTicket) -> Result<ApRepPart, KrbMsgError> {
    let rep: ApRep = picky_asn1_der::from_bytes(bytes).map_err(|e| KrbMsgError::Malformed(e.to_string()))?;
    let enc = &rep.0.enc_part.0;
    let plain = suite(st.etype)
        .ok_or_else(|| KrbMsgError::Internal("service session key etype".into()))?
        .cipher()
        .decrypt(&st.session_key, 12, &enc.cipher.0 .0)
        .map_err(|e| KrbMsgError::Malformed(format!("AP-REP does not decrypt with the service session key: {e}")))?;
    let part: EncApRepPart = picky_asn1_der::from_bytes(&plain).map_err(|e| KrbMsgError::Malformed(e.to_string()))?;
    let p = part.0;
    Ok(ApRepPart {
        ctime: unix(&p.ctime.0).ok_or_else(|| KrbMsgError::Malformed("AP-REP ctime".into()))?,
        cusec: integer_u32(&p.cusec.0),
        subkey: p.subkey.0.map(|k| {
            (
                u8::try_from(integer_u32(&k.0.key_type.0)).unwrap_or(0),
                zeroize::Zeroizing::new(k.0.key_value.0 .0.clone()),
            )
        }),
        seq: p.seq_number.0.map(|s| integer_u32(&s.0)),
    })
}

/// Frames a message for TCP: a 4-byte big-endian length first (RFC 4120 7.2.2).
pub fn frame(msg: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(msg.len() + 4);
    out.extend_from_slice(&u32::try_from(msg.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(msg);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// KERB-ERROR-DATA written by hand from MS-KILE 2.2.1/2.2.2:
    /// 30 11                SEQUENCE
    ///   a1 03 02 01 03       [1] data-type 3 (KERB_ERR_TYPE_EXTENDED)
    ///   a2 0a 04 08          [2] OCTET STRING, 8 bytes (KERB-EXT-ERROR, shortened)
    ///     34 02 00 c0        status 0xC0000234 (LE)
    ///     00 00 00 00        reserved
    #[test]
    fn kerb_ext_error_status_is_read() {
        let v = [
            0x30, 0x11, 0xa1, 0x03, 0x02, 0x01, 0x03, 0xa2, 0x0a, 0x04, 0x08, 0x34, 0x02, 0x00, 0xc0, 0, 0, 0, 0,
        ];
        assert_eq!(kerb_ext_error(&v), Some(0xC000_0234));
        // Another data-type, or truncated: nothing.
        let mut other = v;
        other[6] = 2;
        assert_eq!(kerb_ext_error(&other), None);
        assert_eq!(kerb_ext_error(&v[..10]), None);
    }

    #[test]
    fn hostile_answers_are_errors_not_panics() {
        for b in [
            &[][..],
            &[0x7e][..],
            &[0x7e, 0x83, 0xff][..],
            &[0x30, 0x00][..],
            &[0x7e, 0x02, 0x30, 0x00][..],
        ] {
            let r = read_answer(b);
            assert!(matches!(r, Err(KrbMsgError::Malformed(_))), "{b:02x?}: {r:?}");
        }
        assert_eq!(read_answer(&[0x6b, 0x00]), Ok(AsAnswer::Rep));
    }

    #[test]
    fn as_req_is_an_application_10_with_the_nonce_kept_small() {
        let r = as_req(
            &AsReqInput {
                user: "good",
                realm: "EXAMPLE.TEST",
                nonce: 0xFFFF_FFFF,
                now: 1_800_000_000,
            },
            vec![],
        )
        .expect("encodes");
        assert_eq!(r[0], 0x6a, "[APPLICATION 10]");
        let f = frame(&r);
        assert_eq!(u32::from_be_bytes([f[0], f[1], f[2], f[3]]) as usize, r.len());
        assert!(as_req(
            &AsReqInput {
                user: "caf\u{e9}",
                realm: "EXAMPLE.TEST",
                nonce: 1,
                now: 0
            },
            vec![]
        )
        .is_err());
    }
}
