//! The Kerberos acceptor of the `nla_*` targets that are given a keytab: SPNEGO with Kerberos
//! inside CredSSP, as a Windows RDP server answers it.
//!
//! The keytab is a real one (MIT format 0x0502, e.g. `samba-tool domain exportkeytab`), so the
//! tickets this acceptor reads come from a real KDC. Like Windows, it tries every key of the
//! ticket's etype it holds, whatever principal the ticket names: a ticket for a service whose
//! key it lacks does not decrypt, and the answer is KRB_AP_ERR_MODIFIED
//! (SEC_E_WRONG_PRINCIPAL).
//!
//! Exchange: NegTokenInit { mechToken: AP-REQ } → NegTokenResp { accept-completed, AP-REP with an
//! acceptor subkey and sequence number, mechListMIC } → the client's pubKeyAuth (and its
//! mechListMIC, required once ours was sent) → our pubKeyAuth. Wrap and MIC tokens are RFC 4121,
//! written here from the RFC; the AES and HMAC come from picky-krb.

use std::path::Path;

use picky_asn1::{
    date::Date,
    restricted_string::Ia5String,
    wrapper::{
        ExplicitContextTag0, ExplicitContextTag1, ExplicitContextTag2, ExplicitContextTag3, ExplicitContextTag4,
        ExplicitContextTag5, ExplicitContextTag6, ExplicitContextTag9, GeneralStringAsn1, GeneralizedTimeAsn1,
        IntegerAsn1, OctetStringAsn1, Optional,
    },
};
use picky_krb::{
    crypto::{ChecksumSuite, CipherSuite},
    data_types::{
        Authenticator, EncApRepPart, EncApRepPartInner, EncTicketPart, EncryptedData, EncryptionKey, PrincipalName,
    },
    messages::{ApRep, ApRepInner, ApReq, KrbError, KrbErrorInner},
};

use crate::credssp::{tlv, Reader};

/// One key of a keytab.
#[derive(Clone, PartialEq, Eq)]
pub struct KeytabEntry {
    /// `comp1/comp2@REALM`.
    pub principal: String,
    /// Key version.
    pub kvno: u32,
    /// Encryption type.
    pub etype: u16,
    /// The key.
    pub key: Vec<u8>,
}

impl std::fmt::Debug for KeytabEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeytabEntry")
            .field("principal", &self.principal)
            .field("kvno", &self.kvno)
            .field("etype", &self.etype)
            .finish_non_exhaustive()
    }
}

/// An MIT keytab (format version 0x0502).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Keytab {
    /// Its keys, in file order.
    pub entries: Vec<KeytabEntry>,
}

fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
    if b.len() < n {
        return Err("keytab truncated".into());
    }
    let (head, rest) = b.split_at(n);
    *b = rest;
    Ok(head)
}

fn u16_be(b: &mut &[u8]) -> Result<u16, String> {
    let x = take(b, 2)?;
    Ok(u16::from_be_bytes([x[0], x[1]]))
}

fn u32_be(b: &mut &[u8]) -> Result<u32, String> {
    let x = take(b, 4)?;
    Ok(u32::from_be_bytes([x[0], x[1], x[2], x[3]]))
}

fn counted(b: &mut &[u8]) -> Result<String, String> {
    let n = usize::from(u16_be(b)?);
    Ok(String::from_utf8_lossy(take(b, n)?).into_owned())
}

impl Keytab {
    /// Parses a keytab file's bytes.
    pub fn parse(bytes: &[u8]) -> Result<Keytab, String> {
        let mut b = bytes;
        if take(&mut b, 2)? != [0x05, 0x02] {
            return Err("not a version 0x0502 keytab".into());
        }
        let mut entries = Vec::new();
        while !b.is_empty() {
            let size = u32_be(&mut b)? as i32;
            if size < 0 {
                take(&mut b, size.unsigned_abs() as usize)?;
                continue;
            }
            let mut e = take(&mut b, size as usize)?;
            let components = u16_be(&mut e)?;
            let realm = counted(&mut e)?;
            let names = (0..components)
                .map(|_| counted(&mut e))
                .collect::<Result<Vec<_>, _>>()?;
            let _name_type = u32_be(&mut e)?;
            let _timestamp = u32_be(&mut e)?;
            let vno8 = take(&mut e, 1)?[0];
            let etype = u16_be(&mut e)?;
            let n = usize::from(u16_be(&mut e)?);
            let key = take(&mut e, n)?.to_vec();
            let kvno = if e.len() >= 4 { u32_be(&mut e)? } else { u32::from(vno8) };
            entries.push(KeytabEntry {
                principal: format!("{}@{realm}", names.join("/")),
                kvno,
                etype,
                key,
            });
        }
        Ok(Keytab { entries })
    }

    /// Reads and parses a keytab file.
    pub fn read(path: &Path) -> Result<Keytab, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Keytab::parse(&bytes).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// 1.3.6.1.5.5.2
const OID_SPNEGO: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x02];
/// 1.2.840.113554.1.2.2
const OID_KRB5: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x12, 0x01, 0x02, 0x02];
/// 1.2.840.48018.1.2.2
const OID_MS_KRB5: &[u8] = &[0x2a, 0x86, 0x48, 0x82, 0xf7, 0x12, 0x01, 0x02, 0x02];
/// 1.3.6.1.4.1.311.2.2.10
const OID_NTLM: &[u8] = &[0x2b, 0x06, 0x01, 0x04, 0x01, 0x82, 0x37, 0x02, 0x02, 0x0a];

/// SEC_E_WRONG_PRINCIPAL: what Windows answers for a ticket it cannot decrypt.
pub(crate) const SEC_E_WRONG_PRINCIPAL: u32 = 0x8009_0322;
/// SEC_E_TIME_SKEW.
pub(crate) const SEC_E_TIME_SKEW: u32 = 0x8009_0324;
/// SEC_E_INVALID_TOKEN.
pub(crate) const SEC_E_INVALID_TOKEN: u32 = 0x8009_0308;

/// True when `token` is a SPNEGO initial token (not a raw NTLM message).
pub(crate) fn is_spnego(token: &[u8]) -> bool {
    let mut r = Reader::new(token);
    match r.read(0x60) {
        Ok(body) => Reader::new(body).read(0x06).is_ok_and(|oid| oid == OID_SPNEGO),
        Err(_) => false,
    }
}

/// NegTokenResp { accept-incomplete, supportedMech NTLM }: what a server without Kerberos
/// answers a Kerberos-only offer with.
pub(crate) fn wants_ntlm() -> Vec<u8> {
    let mut seq = tlv(0xa0, &tlv(0x0a, &[1]));
    seq.extend(tlv(0xa1, &tlv(0x06, OID_NTLM)));
    tlv(0xa1, &tlv(0x30, &seq))
}

/// The mechanism list and the AP-REQ of a NegTokenInit.
fn read_neg_token_init(token: &[u8]) -> Result<(Vec<u8>, Vec<u8>), String> {
    let bad = |w: &str| format!("NegTokenInit: {w}");
    let mut r = Reader::new(token);
    let body = r.read(0x60).map_err(|e| bad(&e.to_string()))?;
    let mut r = Reader::new(body);
    r.read(0x06).map_err(|e| bad(&e.to_string()))?;
    let init = r.read(0xa0).map_err(|e| bad(&e.to_string()))?;
    let seq = Reader::new(init).read(0x30).map_err(|e| bad(&e.to_string()))?;
    let mut fields = Reader::new(seq);
    let (mut mechs, mut mech_token) = (None, None);
    while !fields.is_empty() {
        let (tag, v) = fields.read_any().map_err(|e| bad(&e.to_string()))?;
        match tag {
            0xa0 => mechs = Some(v.to_vec()),
            0xa2 => mech_token = Some(Reader::new(v).read(0x04).map_err(|e| bad(&e.to_string()))?.to_vec()),
            _ => {}
        }
    }
    let mechs = mechs.ok_or_else(|| bad("no mechTypes"))?;
    let mech_token = mech_token.ok_or_else(|| bad("no mechToken"))?;
    // The GSS krb5 framing: 60 { OID, 01 00, AP-REQ }.
    let body = Reader::new(&mech_token).read(0x60).map_err(|e| bad(&e.to_string()))?;
    let mut r = Reader::new(body);
    let oid = r.read(0x06).map_err(|e| bad(&e.to_string()))?;
    if oid != OID_KRB5 && oid != OID_MS_KRB5 {
        return Err(bad("the mechToken is not Kerberos"));
    }
    let rest = &body[2 + oid.len()..];
    match rest {
        [0x01, 0x00, ap_req @ ..] => Ok((mechs, ap_req.to_vec())),
        _ => Err(bad("the mechToken is not an AP-REQ")),
    }
}

fn krb5_token(tok_id: [u8; 2], msg: &[u8]) -> Vec<u8> {
    let mut inner = tlv(0x06, OID_KRB5);
    inner.extend_from_slice(&tok_id);
    inner.extend_from_slice(msg);
    tlv(0x60, &inner)
}

pub(crate) fn int_of(i: &IntegerAsn1) -> u32 {
    i.as_unsigned_bytes_be()
        .iter()
        .rev()
        .take(4)
        .rev()
        .fold(0u32, |acc, b| (acc << 8) | u32::from(*b))
}

fn unix_of(t: &GeneralizedTimeAsn1) -> Option<i64> {
    let d = &t.0;
    time::Date::from_calendar_date(i32::from(d.year()), time::Month::try_from(d.month()).ok()?, d.day())
        .ok()?
        .with_hms(d.hour(), d.minute(), d.second())
        .ok()
        .map(|t| t.assume_utc().unix_timestamp())
}

pub(crate) fn time_of(t: i64) -> Option<GeneralizedTimeAsn1> {
    let dt = time::OffsetDateTime::from_unix_timestamp(t).ok()?;
    Date::new(
        u16::try_from(dt.year()).ok()?,
        u8::from(dt.month()),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second(),
    )
    .map(GeneralizedTimeAsn1::from)
}

fn suite(etype: u32) -> Option<(CipherSuite, ChecksumSuite)> {
    match etype {
        18 => Some((CipherSuite::Aes256CtsHmacSha196, ChecksumSuite::HmacSha196Aes256)),
        17 => Some((CipherSuite::Aes128CtsHmacSha196, ChecksumSuite::HmacSha196Aes128)),
        _ => None,
    }
}

/// Why the acceptor refuses: a KRB-ERROR code and the SECURITY_STATUS for the errorCode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Refused {
    pub(crate) krb_error: u32,
    pub(crate) status: u32,
    pub(crate) why: String,
}

fn refused(krb_error: u32, status: u32, why: impl Into<String>) -> Refused {
    Refused {
        krb_error,
        status,
        why: why.into(),
    }
}

/// The established context after the AP-REQ.
pub(crate) struct Context {
    etype: u32,
    key: Vec<u8>,
    /// The client's sequence number and ours.
    client_seq: u64,
    our_seq: u64,
    mech_types: Vec<u8>,
    /// Client user@REALM, for the log.
    pub(crate) client: String,
}

/// Flags of RFC 4121 tokens.
const SENT_BY_ACCEPTOR: u8 = 0x01;
const SEALED: u8 = 0x02;
const ACCEPTOR_SUBKEY: u8 = 0x04;

/// Reads the AP-REQ with the keytab; `now` is the target's clock (skew included). The answer
/// NegTokenResp carries the AP-REP and our mechListMIC.
pub(crate) fn accept(
    keytab: &Keytab,
    token: &[u8],
    now: i64,
    random: &mut dyn FnMut(&mut [u8]),
) -> Result<(Context, Vec<u8>), Refused> {
    let (mech_types, ap) = read_neg_token_init(token).map_err(|e| refused(60, SEC_E_INVALID_TOKEN, e))?;
    let ap: ApReq = picky_asn1_der::from_bytes(&ap).map_err(|e| refused(60, SEC_E_INVALID_TOKEN, e.to_string()))?;
    let ticket = &ap.0.ticket.0 .0;
    let etype = int_of(&ticket.enc_part.0.etype.0);
    let (cs, _) = suite(etype).ok_or_else(|| refused(14, SEC_E_INVALID_TOKEN, format!("ticket etype {etype}")))?;
    let cipher = cs.cipher();
    // Like Windows: every key of that etype we hold, whatever the ticket names.
    let plain = keytab
        .entries
        .iter()
        .filter(|e| u32::from(e.etype) == etype)
        .find_map(|e| cipher.decrypt(&e.key, 2, &ticket.enc_part.0.cipher.0 .0).ok())
        .ok_or_else(|| {
            refused(
                41,
                SEC_E_WRONG_PRINCIPAL,
                "the ticket does not decrypt with any key of the keytab (a ticket for another service)",
            )
        })?;
    let part: EncTicketPart =
        picky_asn1_der::from_bytes(&plain).map_err(|e| refused(60, SEC_E_INVALID_TOKEN, e.to_string()))?;
    let part = part.0;
    if unix_of(&part.endtime.0).is_some_and(|end| end < now) {
        return Err(refused(32, SEC_E_INVALID_TOKEN, "ticket expired"));
    }
    let session_etype = int_of(&part.key.0.key_type.0);
    let session_key = part.key.0.key_value.0 .0.clone();
    let (scs, _) = suite(session_etype).ok_or_else(|| refused(14, SEC_E_INVALID_TOKEN, "session key etype"))?;
    let auth_plain = scs
        .cipher()
        .decrypt(&session_key, 11, &ap.0.authenticator.0.cipher.0 .0)
        .map_err(|_| refused(31, SEC_E_INVALID_TOKEN, "the authenticator does not decrypt"))?;
    let auth: Authenticator =
        picky_asn1_der::from_bytes(&auth_plain).map_err(|e| refused(60, SEC_E_INVALID_TOKEN, e.to_string()))?;
    let auth = auth.0;
    if auth.cname.0 != part.cname.0 || auth.crealm.0 .0 != part.crealm.0 .0 {
        return Err(refused(
            36,
            SEC_E_INVALID_TOKEN,
            "the authenticator names another client",
        ));
    }
    let ctime = unix_of(&auth.ctime.0).ok_or_else(|| refused(60, SEC_E_INVALID_TOKEN, "ctime"))?;
    if (ctime - now).abs() > 300 {
        return Err(refused(37, SEC_E_TIME_SKEW, format!("client time {ctime}, ours {now}")));
    }
    let gss = auth
        .cksum
        .0
        .as_ref()
        .map(|c| c.0.checksum.0 .0.clone())
        .unwrap_or_default();
    let ck_type = auth.cksum.0.as_ref().map(|c| int_of(&c.0.cksumtype.0)).unwrap_or(0);
    if ck_type != 0x8003 || gss.len() < 24 || u32::from_le_bytes([gss[20], gss[21], gss[22], gss[23]]) & 0x02 == 0 {
        return Err(refused(
            60,
            SEC_E_INVALID_TOKEN,
            "no GSS checksum asking for mutual authentication",
        ));
    }
    if !ap.0.ap_options.0 .0.is_set(2) {
        return Err(refused(60, SEC_E_INVALID_TOKEN, "mutual-required not set"));
    }
    let client_seq = auth.seq_number.0.as_ref().map_or(0, |s| u64::from(int_of(&s.0)));
    // Our subkey and sequence number, as Windows sends them.
    let mut sub = vec![0u8; if session_etype == 17 { 16 } else { 32 }];
    random(&mut sub);
    let mut s = [0u8; 4];
    random(&mut s);
    let our_seq = u32::from_be_bytes(s) & 0x3FFF_FFFF;
    let rep_part = EncApRepPart::from(EncApRepPartInner {
        ctime: ExplicitContextTag0::from(auth.ctime.0.clone()),
        cusec: ExplicitContextTag1::from(auth.cusec.0.clone()),
        subkey: Optional::from(Some(ExplicitContextTag2::from(EncryptionKey {
            key_type: ExplicitContextTag0::from(IntegerAsn1::from_bytes_be_unsigned(
                session_etype.to_be_bytes().to_vec(),
            )),
            key_value: ExplicitContextTag1::from(OctetStringAsn1::from(sub.clone())),
        }))),
        seq_number: Optional::from(Some(ExplicitContextTag3::from(IntegerAsn1::from_bytes_be_unsigned(
            our_seq.to_be_bytes().to_vec(),
        )))),
    });
    let der = |v: &dyn erased::Ser| v.der().map_err(|e| refused(60, SEC_E_INVALID_TOKEN, e));
    let sealed = scs
        .cipher()
        .encrypt(&session_key, 12, &der(&rep_part)?)
        .map_err(|e| refused(60, SEC_E_INVALID_TOKEN, e.to_string()))?;
    let rep = ApRep::from(ApRepInner {
        pvno: ExplicitContextTag0::from(IntegerAsn1::from(vec![5])),
        msg_type: ExplicitContextTag1::from(IntegerAsn1::from(vec![15])),
        enc_part: ExplicitContextTag2::from(EncryptedData {
            etype: ExplicitContextTag0::from(IntegerAsn1::from_bytes_be_unsigned(
                session_etype.to_be_bytes().to_vec(),
            )),
            kvno: Optional::from(None),
            cipher: ExplicitContextTag2::from(OctetStringAsn1::from(sealed)),
        }),
    });
    let client = format!(
        "{}@{}",
        auth.cname
            .0
            .name_string
            .0
             .0
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .join("/"),
        auth.crealm.0 .0
    );
    let mut ctx = Context {
        etype: session_etype,
        key: sub,
        client_seq,
        our_seq: u64::from(our_seq),
        mech_types,
        client,
    };
    let our_mic = ctx
        .mic(&ctx.mech_types.clone())
        .map_err(|e| refused(60, SEC_E_INVALID_TOKEN, e))?;
    let mut seq = tlv(0xa0, &tlv(0x0a, &[0]));
    seq.extend(tlv(0xa1, &tlv(0x06, OID_MS_KRB5)));
    seq.extend(tlv(0xa2, &tlv(0x04, &krb5_token([0x02, 0x00], &der(&rep)?))));
    seq.extend(tlv(0xa3, &tlv(0x04, &our_mic)));
    Ok((ctx, tlv(0xa1, &tlv(0x30, &seq))))
}

/// NegTokenResp { reject, KRB-ERROR }: the answer beside the errorCode of a refusal.
pub(crate) fn error_token(r: &Refused, now: i64) -> Vec<u8> {
    let name = |parts: &[&str]| PrincipalName {
        name_type: ExplicitContextTag0::from(IntegerAsn1::from(vec![2])),
        name_string: ExplicitContextTag1::from(picky_asn1::wrapper::Asn1SequenceOf::from(
            parts
                .iter()
                .filter_map(|p| {
                    Ia5String::from_string((*p).to_owned())
                        .ok()
                        .map(GeneralStringAsn1::from)
                })
                .collect::<Vec<_>>(),
        )),
    };
    let realm = Ia5String::from_string("SIMDOM.TEST".to_owned()).map(GeneralStringAsn1::from);
    let err = realm.ok().zip(time_of(now)).map(|(realm, stime)| {
        KrbError::from(KrbErrorInner {
            pvno: ExplicitContextTag0::from(IntegerAsn1::from(vec![5])),
            msg_type: ExplicitContextTag1::from(IntegerAsn1::from(vec![30])),
            ctime: Optional::from(None),
            cusec: Optional::from(None),
            stime: ExplicitContextTag4::from(stime),
            susec: ExplicitContextTag5::from(IntegerAsn1::from(vec![0])),
            error_code: ExplicitContextTag6::from(r.krb_error),
            crealm: Optional::from(None),
            cname: Optional::from(None),
            realm: ExplicitContextTag9::from(realm),
            sname: picky_asn1::wrapper::ExplicitContextTag10::from(name(&["TERMSRV", "sim"])),
            e_text: Optional::from(None),
            e_data: Optional::from(None),
        })
    });
    let mut seq = tlv(0xa0, &tlv(0x0a, &[2]));
    if let Some(bytes) = err.and_then(|e| picky_asn1_der::to_vec(&e).ok()) {
        seq.extend(tlv(0xa2, &tlv(0x04, &krb5_token([0x03, 0x00], &bytes))));
    }
    tlv(0xa1, &tlv(0x30, &seq))
}

mod erased {
    /// DER of a picky type, object-safe.
    pub(super) trait Ser {
        fn der(&self) -> Result<Vec<u8>, String>;
    }
    impl<T: serde::Serialize> Ser for T {
        fn der(&self) -> Result<Vec<u8>, String> {
            picky_asn1_der::to_vec(self).map_err(|e| e.to_string())
        }
    }
}

impl Context {
    fn checksum(&self, usage: i32, data: &[u8]) -> Result<Vec<u8>, String> {
        let (_, ck) = suite(self.etype).ok_or("etype")?;
        ck.hasher().checksum(&self.key, usage, data).map_err(|e| e.to_string())
    }

    /// Our MIC token over `data` (acceptor sign, 23).
    fn mic(&mut self, data: &[u8]) -> Result<Vec<u8>, String> {
        let mut header = [0xffu8; 16];
        header[..3].copy_from_slice(&[0x04, 0x04, SENT_BY_ACCEPTOR | ACCEPTOR_SUBKEY]);
        header[8..].copy_from_slice(&self.our_seq.to_be_bytes());
        self.our_seq += 1;
        let mut signed = data.to_vec();
        signed.extend_from_slice(&header);
        let mut out = header.to_vec();
        out.extend(self.checksum(23, &signed)?);
        Ok(out)
    }

    /// Verifies the client's mechListMIC (initiator sign, 25) in its NegTokenResp.
    pub(crate) fn verify_client_mic(&mut self, nego_token: &[u8]) -> Result<(), String> {
        let resp = Reader::new(nego_token).read(0xa1).map_err(|e| e.to_string())?;
        let seq = Reader::new(resp).read(0x30).map_err(|e| e.to_string())?;
        let mut fields = Reader::new(seq);
        let mut mic = None;
        while !fields.is_empty() {
            let (tag, v) = fields.read_any().map_err(|e| e.to_string())?;
            if tag == 0xa3 {
                mic = Some(Reader::new(v).read(0x04).map_err(|e| e.to_string())?.to_vec());
            }
        }
        let mic = mic.ok_or("no mechListMIC")?;
        if mic.len() != 28
            || mic[..2] != [0x04, 0x04]
            || mic[2] & SENT_BY_ACCEPTOR != 0
            || mic[2] & ACCEPTOR_SUBKEY == 0
        {
            return Err("not an initiator MIC token under our subkey".into());
        }
        if u64::from_be_bytes(mic[8..16].try_into().map_err(|_| "seq")?) != self.client_seq {
            return Err("MIC sequence number is not the client's first".into());
        }
        let mut signed = self.mech_types.clone();
        signed.extend_from_slice(&mic[..16]);
        if self.checksum(25, &signed)? != mic[16..] {
            return Err("the client's mechListMIC does not verify".into());
        }
        self.client_seq += 1;
        Ok(())
    }

    /// Unwraps the client's pubKeyAuth (initiator seal, 24).
    pub(crate) fn unwrap(&mut self, token: &[u8]) -> Result<Vec<u8>, String> {
        if token.len() < 32 || token[..2] != [0x05, 0x04] || token[3] != 0xff {
            return Err("not a Wrap token".into());
        }
        let flags = token[2];
        if flags & SEALED == 0 || flags & SENT_BY_ACCEPTOR != 0 || flags & ACCEPTOR_SUBKEY == 0 {
            return Err(format!("Wrap flags {flags:#04x}"));
        }
        let ec = usize::from(u16::from_be_bytes([token[4], token[5]]));
        let rrc = usize::from(u16::from_be_bytes([token[6], token[7]]));
        let seq = u64::from_be_bytes(token[8..16].try_into().map_err(|_| "seq")?);
        if seq != self.client_seq {
            return Err(format!("sequence number {seq}, expected {}", self.client_seq));
        }
        let mut body = token[16..].to_vec();
        let n = body.len();
        body.rotate_left((rrc + ec) % n);
        let (cs, _) = suite(self.etype).ok_or("etype")?;
        let plain = cs.cipher().decrypt(&self.key, 24, &body).map_err(|e| e.to_string())?;
        if plain.len() < 16 + ec {
            return Err("short".into());
        }
        let (data, hdr) = plain.split_at(plain.len() - 16);
        if hdr[..6] != token[..6] || hdr[6..8] != [0, 0] || hdr[8..] != token[8..16] {
            return Err("inner header differs".into());
        }
        self.client_seq += 1;
        Ok(data[..data.len() - ec].to_vec())
    }

    /// Wraps our pubKeyAuth (acceptor seal, 22), RRC 28 as Windows.
    pub(crate) fn wrap(&mut self, data: &[u8]) -> Result<Vec<u8>, String> {
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&[0x05, 0x04, SENT_BY_ACCEPTOR | SEALED | ACCEPTOR_SUBKEY, 0xff]);
        header[8..].copy_from_slice(&self.our_seq.to_be_bytes());
        self.our_seq += 1;
        let mut plain = data.to_vec();
        plain.extend_from_slice(&header);
        let (cs, _) = suite(self.etype).ok_or("etype")?;
        let mut sealed = cs.cipher().encrypt(&self.key, 22, &plain).map_err(|e| e.to_string())?;
        let n = sealed.len();
        sealed.rotate_right(28 % n);
        header[6..8].copy_from_slice(&28u16.to_be_bytes());
        let mut out = header.to_vec();
        out.extend(sealed);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A keytab written by hand from the MIT format: one entry, TERMSRV/rdp01@EXAMPLE.TEST,
    /// kvno 3 (in the trailing 32-bit field), etype 18, a 32-byte key of 0x11.
    #[test]
    fn keytab_is_parsed() {
        let mut entry = vec![0x00, 0x02]; // two components
        entry.extend_from_slice(&[0x00, 0x0c]);
        entry.extend_from_slice(b"EXAMPLE.TEST");
        entry.extend_from_slice(&[0x00, 0x07]);
        entry.extend_from_slice(b"TERMSRV");
        entry.extend_from_slice(&[0x00, 0x05]);
        entry.extend_from_slice(b"rdp01");
        entry.extend_from_slice(&[0, 0, 0, 1]); // KRB5_NT_PRINCIPAL
        entry.extend_from_slice(&[0x65, 0, 0, 0]); // timestamp
        entry.push(3); // vno8
        entry.extend_from_slice(&[0x00, 0x12, 0x00, 0x20]);
        entry.extend_from_slice(&[0x11; 32]);
        entry.extend_from_slice(&[0, 0, 0, 3]);
        let mut file = vec![0x05, 0x02];
        file.extend_from_slice(&(entry.len() as u32).to_be_bytes());
        file.extend_from_slice(&entry);
        // A hole (negative size) is skipped.
        file.extend_from_slice(&(-4i32).to_be_bytes());
        file.extend_from_slice(&[0; 4]);
        let k = Keytab::parse(&file).expect("parses");
        assert_eq!(k.entries.len(), 1);
        assert_eq!(k.entries[0].principal, "TERMSRV/rdp01@EXAMPLE.TEST");
        assert_eq!((k.entries[0].kvno, k.entries[0].etype), (3, 18));
        assert_eq!(k.entries[0].key, vec![0x11; 32]);
        assert!(Keytab::parse(&file[..file.len() - 20]).is_err());
        assert!(Keytab::parse(&[0x05, 0x01]).is_err());
    }

    #[test]
    fn raw_ntlm_is_not_spnego() {
        assert!(!is_spnego(b"NTLMSSP\0\x01\0\0\0"));
        let mut t = tlv(0x06, OID_SPNEGO);
        t.extend(tlv(0xa0, &[]));
        assert!(is_spnego(&tlv(0x60, &t)));
    }
}
