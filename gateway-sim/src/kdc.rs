//! A simulated Active Directory KDC for the realm `SIMDOM.TEST`, over TCP (RFC 4120 7.2.2
//! framing), answering as Windows does:
//!
//! - AS-REQ without pre-authentication: KDC_ERR_PREAUTH_REQUIRED (25) with PA-ETYPE-INFO2 (AES256,
//!   salt `SIMDOM.TEST<name>` with the account's stored case); an unknown name 6; a disabled,
//!   locked or expired account, or one outside its logon hours, 18 with the NTSTATUS in
//!   KERB-ERROR-DATA before any password is spent.
//! - AS-REQ with PA-ENC-TIMESTAMP: 24 for a wrong password, 23 (+ NTSTATUS) for a password that
//!   must change or has expired, else an AS-REP with a TGT.
//! - TGS-REQ with that TGT: a ticket for `TERMSRV/<spn>` of every target that has `kerberos_spn`,
//!   7 (KDC_ERR_S_PRINCIPAL_UNKNOWN) for any other name (an IP address always).
//!
//! Service keys are derived from the SPN ([`service_keytab`]), so a target holds its keytab
//! without a file. The message types and AES come from picky-krb.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use picky_asn1::{
    bit_string::BitString,
    restricted_string::Ia5String,
    wrapper::{
        Asn1SequenceOf, ExplicitContextTag0, ExplicitContextTag1, ExplicitContextTag10, ExplicitContextTag2,
        ExplicitContextTag3, ExplicitContextTag4, ExplicitContextTag5, ExplicitContextTag6, ExplicitContextTag7,
        ExplicitContextTag9, GeneralStringAsn1, GeneralizedTimeAsn1, IntegerAsn1, OctetStringAsn1, Optional,
    },
};
use picky_krb::{
    crypto::CipherSuite,
    data_types::{
        Authenticator, EncTicketPart, EncTicketPartInner, EncryptedData, EncryptionKey, KerberosFlags, LastReqInner,
        PaEncTsEnc, PrincipalName, Ticket, TicketInner, TransitedEncoding,
    },
    messages::{
        ApReq, AsRep, AsReq, EncAsRepPart, EncKdcRepPart, EncTgsRepPart, KdcRep, KrbError, KrbErrorInner, TgsRep,
        TgsReq,
    },
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};
use tracing::debug;

use crate::{
    credssp::tlv,
    kerberos::{int_of, time_of, Keytab, KeytabEntry},
    scenario::Account,
};

/// The realm.
pub const REALM: &str = "SIMDOM.TEST";
const AES256: u8 = 18;

fn cipher() -> Box<dyn picky_krb::crypto::Cipher> {
    CipherSuite::Aes256CtsHmacSha196.cipher()
}

/// The keytab of the target whose `TERMSRV/<spn>` the KDC knows (key derived from the SPN).
pub fn service_keytab(spn: &str) -> Keytab {
    let host = spn.to_ascii_lowercase();
    let key = cipher()
        .generate_key_from_password(
            format!("sim-machine-{host}").as_bytes(),
            format!("{REALM}termsrv{host}").as_bytes(),
        )
        .unwrap_or_default();
    Keytab {
        entries: vec![KeytabEntry {
            principal: format!("TERMSRV/{host}@{REALM}"),
            kvno: 1,
            etype: u16::from(AES256),
            key,
        }],
    }
}

/// A running KDC.
pub struct Kdc {
    addr: SocketAddr,
    preauth: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Kdc {
    /// `host:port`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Pre-authenticated AS-REQs received (password attempts).
    pub fn password_attempts(&self) -> u64 {
        self.preauth.load(Ordering::Relaxed)
    }
}

impl std::fmt::Debug for Kdc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kdc").field("addr", &self.addr).finish_non_exhaustive()
    }
}

impl Drop for Kdc {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Db {
    accounts: HashMap<String, Account>,
    spns: HashMap<String, Vec<u8>>,
    krbtgt: Vec<u8>,
    preauth: Arc<AtomicU64>,
}

/// Starts a KDC on 127.0.0.1 for `accounts` and the `TERMSRV/<spn>` services.
pub async fn start_kdc(accounts: &[Account], spns: &[String]) -> std::io::Result<Kdc> {
    let mut krbtgt = vec![0u8; 32];
    {
        use ring::rand::SecureRandom;
        let _ = ring::rand::SystemRandom::new().fill(&mut krbtgt);
    }
    let preauth = Arc::new(AtomicU64::new(0));
    let db = Arc::new(Db {
        accounts: accounts
            .iter()
            .map(|a| (a.name.to_ascii_lowercase(), a.clone()))
            .collect(),
        spns: spns
            .iter()
            .map(|s| {
                let k = service_keytab(s);
                (s.to_ascii_lowercase(), k.entries[0].key.clone())
            })
            .collect(),
        krbtgt,
        preauth: preauth.clone(),
    });
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let db = db.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(10), serve(s, &db)).await;
            });
        }
    });
    Ok(Kdc { addr, preauth, task })
}

async fn serve(mut s: TcpStream, db: &Db) -> std::io::Result<()> {
    loop {
        let mut len = [0u8; 4];
        if s.read_exact(&mut len).await.is_err() {
            return Ok(());
        }
        let n = u32::from_be_bytes(len) as usize;
        if n > 64 * 1024 {
            return Ok(());
        }
        let mut body = vec![0u8; n];
        s.read_exact(&mut body).await?;
        let answer = answer(db, &body, now());
        s.write_all(&(answer.len() as u32).to_be_bytes()).await?;
        s.write_all(&answer).await?;
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0))
}

fn kstr(s: &str) -> GeneralStringAsn1 {
    GeneralStringAsn1::from(Ia5String::from_string(s.to_owned()).unwrap_or_default())
}

fn time(t: i64) -> GeneralizedTimeAsn1 {
    match time_of(t) {
        Some(g) => g,
        // Out of GeneralizedTime's range: the epoch, which always is in it.
        None => time(0),
    }
}

fn principal(kind: u8, parts: &[&str]) -> PrincipalName {
    PrincipalName {
        name_type: ExplicitContextTag0::from(IntegerAsn1::from(vec![kind])),
        name_string: ExplicitContextTag1::from(Asn1SequenceOf::from(parts.iter().map(|p| kstr(p)).collect::<Vec<_>>())),
    }
}

fn names(p: &PrincipalName) -> Vec<String> {
    p.name_string.0 .0.iter().map(|s| s.to_string()).collect()
}

fn der<T: serde::Serialize>(v: &T) -> Vec<u8> {
    picky_asn1_der::to_vec(v).unwrap_or_default()
}

fn error(code: u32, now: i64, sname: PrincipalName, e_data: Option<Vec<u8>>) -> Vec<u8> {
    der(&KrbError::from(KrbErrorInner {
        pvno: ExplicitContextTag0::from(IntegerAsn1::from(vec![5])),
        msg_type: ExplicitContextTag1::from(IntegerAsn1::from(vec![30])),
        ctime: Optional::from(None),
        cusec: Optional::from(None),
        stime: ExplicitContextTag4::from(time(now)),
        susec: ExplicitContextTag5::from(IntegerAsn1::from(vec![0])),
        error_code: ExplicitContextTag6::from(code),
        crealm: Optional::from(None),
        cname: Optional::from(None),
        realm: ExplicitContextTag9::from(kstr(REALM)),
        sname: ExplicitContextTag10::from(sname),
        e_text: Optional::from(None),
        e_data: Optional::from(
            e_data.map(|d| picky_asn1::wrapper::ExplicitContextTag12::from(OctetStringAsn1::from(d))),
        ),
    }))
}

/// KERB-ERROR-DATA { data-type 3, KERB-EXT-ERROR { status, reserved, flags } } (MS-KILE 2.2.1).
fn ext_error(status: u32) -> Vec<u8> {
    let mut ext = status.to_le_bytes().to_vec();
    ext.extend_from_slice(&[0; 4]);
    ext.extend_from_slice(&1u32.to_le_bytes());
    let mut seq = tlv(0xa1, &tlv(0x02, &[3]));
    seq.extend(tlv(0xa2, &tlv(0x04, &ext)));
    tlv(0x30, &seq)
}

/// METHOD-DATA { PA-ETYPE-INFO2 { AES256, salt } }.
fn etype_info2(salt: &str) -> Vec<u8> {
    let mut entry = tlv(0xa0, &tlv(0x02, &[AES256]));
    entry.extend(tlv(0xa1, &tlv(0x1b, salt.as_bytes())));
    let info = tlv(0x30, &tlv(0x30, &entry));
    let mut pa = tlv(0xa1, &tlv(0x02, &[19]));
    pa.extend(tlv(0xa2, &tlv(0x04, &info)));
    tlv(0x30, &tlv(0x30, &pa))
}

/// The NTSTATUS a Windows KDC tells before pre-authentication, by account state.
fn before_preauth(state: &str) -> Option<u32> {
    match state {
        "disabled" => Some(0xC000_0072),
        "locked" => Some(0xC000_0234),
        "account_expired" => Some(0xC000_0193),
        "logon_hours" => Some(0xC000_006F),
        _ => None,
    }
}

fn answer(db: &Db, req: &[u8], now: i64) -> Vec<u8> {
    let krbtgt = principal(2, &["krbtgt", REALM]);
    match req.first() {
        Some(0x6a) => match picky_asn1_der::from_bytes::<AsReq>(req) {
            Ok(r) => as_rep(db, &r.0, now),
            Err(_) => error(60, now, krbtgt, None),
        },
        Some(0x6c) => match picky_asn1_der::from_bytes::<TgsReq>(req) {
            Ok(r) => tgs_rep(db, &r.0, now),
            Err(_) => error(60, now, krbtgt, None),
        },
        _ => error(60, now, krbtgt, None),
    }
}

fn ticket(key: &[u8], sname: PrincipalName, session: &[u8], cname: &PrincipalName, now: i64) -> Ticket {
    let part = EncTicketPart::from(EncTicketPartInner {
        flags: ExplicitContextTag0::from(KerberosFlags::from(BitString::with_len(32))),
        key: ExplicitContextTag1::from(EncryptionKey {
            key_type: ExplicitContextTag0::from(IntegerAsn1::from(vec![AES256])),
            key_value: ExplicitContextTag1::from(OctetStringAsn1::from(session.to_vec())),
        }),
        crealm: ExplicitContextTag2::from(kstr(REALM)),
        cname: ExplicitContextTag3::from(cname.clone()),
        transited: ExplicitContextTag4::from(TransitedEncoding {
            tr_type: ExplicitContextTag0::from(IntegerAsn1::from(vec![1])),
            contents: ExplicitContextTag1::from(OctetStringAsn1::from(Vec::new())),
        }),
        auth_time: ExplicitContextTag5::from(time(now)),
        starttime: Optional::from(None),
        endtime: ExplicitContextTag7::from(time(now + 10 * 3600)),
        renew_till: Optional::from(None),
        caddr: Optional::from(None),
        authorization_data: Optional::from(None),
    });
    let sealed = cipher().encrypt(key, 2, &der(&part)).unwrap_or_default();
    Ticket::from(TicketInner {
        tkt_vno: ExplicitContextTag0::from(IntegerAsn1::from(vec![5])),
        realm: ExplicitContextTag1::from(kstr(REALM)),
        sname: ExplicitContextTag2::from(sname),
        enc_part: ExplicitContextTag3::from(EncryptedData {
            etype: ExplicitContextTag0::from(IntegerAsn1::from(vec![AES256])),
            kvno: Optional::from(Some(ExplicitContextTag1::from(IntegerAsn1::from(vec![1])))),
            cipher: ExplicitContextTag2::from(OctetStringAsn1::from(sealed)),
        }),
    })
}

fn rep_part(session: &[u8], nonce: &IntegerAsn1, sname: PrincipalName, now: i64) -> EncKdcRepPart {
    EncKdcRepPart {
        key: ExplicitContextTag0::from(EncryptionKey {
            key_type: ExplicitContextTag0::from(IntegerAsn1::from(vec![AES256])),
            key_value: ExplicitContextTag1::from(OctetStringAsn1::from(session.to_vec())),
        }),
        last_req: ExplicitContextTag1::from(Asn1SequenceOf::from(vec![LastReqInner {
            lr_type: ExplicitContextTag0::from(IntegerAsn1::from(vec![0])),
            lr_value: ExplicitContextTag1::from(time(now)),
        }])),
        nonce: ExplicitContextTag2::from(nonce.clone()),
        key_expiration: Optional::from(None),
        flags: ExplicitContextTag4::from(KerberosFlags::from(BitString::with_len(32))),
        auth_time: ExplicitContextTag5::from(time(now)),
        start_time: Optional::from(None),
        end_time: ExplicitContextTag7::from(time(now + 10 * 3600)),
        renew_till: Optional::from(None),
        srealm: ExplicitContextTag9::from(kstr(REALM)),
        sname: ExplicitContextTag10::from(sname),
        caddr: Optional::from(None),
        encrypted_pa_data: Optional::from(None),
    }
}

fn random_key() -> Vec<u8> {
    use ring::rand::SecureRandom;
    let mut k = vec![0u8; 32];
    let _ = ring::rand::SystemRandom::new().fill(&mut k);
    k
}

fn kdc_rep(msg_type: u8, cname: PrincipalName, ticket: Ticket, sealed: Vec<u8>) -> KdcRep {
    KdcRep {
        pvno: ExplicitContextTag0::from(IntegerAsn1::from(vec![5])),
        msg_type: ExplicitContextTag1::from(IntegerAsn1::from(vec![msg_type])),
        padata: Optional::from(None),
        crealm: ExplicitContextTag3::from(kstr(REALM)),
        cname: ExplicitContextTag4::from(cname),
        ticket: ExplicitContextTag5::from(ticket),
        enc_part: ExplicitContextTag6::from(EncryptedData {
            etype: ExplicitContextTag0::from(IntegerAsn1::from(vec![AES256])),
            kvno: Optional::from(None),
            cipher: ExplicitContextTag2::from(OctetStringAsn1::from(sealed)),
        }),
    }
}

fn as_rep(db: &Db, req: &picky_krb::messages::KdcReq, now: i64) -> Vec<u8> {
    let krbtgt = principal(2, &["krbtgt", REALM]);
    let body = &req.req_body.0;
    let Some(cname) = body.cname.0.as_ref().map(|c| c.0.clone()) else {
        return error(60, now, krbtgt, None);
    };
    let name = names(&cname).join("/");
    let Some(account) = db.accounts.get(&name.to_ascii_lowercase()) else {
        return error(6, now, krbtgt, None);
    };
    if let Some(status) = before_preauth(&account.state) {
        return error(18, now, krbtgt, Some(ext_error(status)));
    }
    let salt = format!("{REALM}{}", account.name);
    let ts = req.padata.0.as_ref().and_then(|p| {
        p.0 .0
            .iter()
            .find(|pa| int_of(&pa.padata_type.0) == 2)
            .map(|pa| pa.padata_data.0 .0.clone())
    });
    let Some(ts) = ts else {
        return error(25, now, krbtgt, Some(etype_info2(&salt)));
    };
    db.preauth.fetch_add(1, Ordering::Relaxed);
    let key = cipher()
        .generate_key_from_password(account.password.as_bytes(), salt.as_bytes())
        .unwrap_or_default();
    let ok = picky_asn1_der::from_bytes::<EncryptedData>(&ts)
        .ok()
        .and_then(|e| cipher().decrypt(&key, 1, &e.cipher.0 .0).ok())
        .and_then(|p| picky_asn1_der::from_bytes::<PaEncTsEnc>(&p).ok())
        .is_some();
    if !ok {
        debug!(account = %account.name, "AS-REQ: wrong password (24)");
        return error(24, now, krbtgt, None);
    }
    match account.state.as_str() {
        "must_change" => return error(23, now, krbtgt, Some(ext_error(0xC000_0224))),
        "password_expired" => return error(23, now, krbtgt, Some(ext_error(0xC000_0071))),
        _ => {}
    }
    let session = random_key();
    let tgt = ticket(&db.krbtgt, krbtgt.clone(), &session, &cname, now);
    let part = EncAsRepPart::from(rep_part(&session, &body.nonce.0, krbtgt, now));
    let sealed = cipher().encrypt(&key, 3, &der(&part)).unwrap_or_default();
    der(&AsRep::from(kdc_rep(11, cname, tgt, sealed)))
}

fn tgs_rep(db: &Db, req: &picky_krb::messages::KdcReq, now: i64) -> Vec<u8> {
    let body = &req.req_body.0;
    let sname = body
        .sname
        .0
        .as_ref()
        .map(|s| s.0.clone())
        .unwrap_or_else(|| principal(2, &[]));
    let ap = req.padata.0.as_ref().and_then(|p| {
        p.0 .0
            .iter()
            .find(|pa| int_of(&pa.padata_type.0) == 1)
            .and_then(|pa| picky_asn1_der::from_bytes::<ApReq>(&pa.padata_data.0 .0).ok())
    });
    let Some(ap) = ap else {
        return error(60, now, sname, None);
    };
    let Some(tgt) = cipher()
        .decrypt(&db.krbtgt, 2, &ap.0.ticket.0 .0.enc_part.0.cipher.0 .0)
        .ok()
        .and_then(|p| picky_asn1_der::from_bytes::<EncTicketPart>(&p).ok())
    else {
        return error(31, now, sname, None);
    };
    let tgt_session = tgt.0.key.0.key_value.0 .0.clone();
    let authentic = cipher()
        .decrypt(&tgt_session, 7, &ap.0.authenticator.0.cipher.0 .0)
        .ok()
        .and_then(|p| picky_asn1_der::from_bytes::<Authenticator>(&p).ok())
        .is_some();
    if !authentic {
        return error(31, now, sname, None);
    }
    let parts = names(&sname);
    let key = match parts.as_slice() {
        [svc, host] if svc.eq_ignore_ascii_case("TERMSRV") => db.spns.get(&host.to_ascii_lowercase()),
        _ => None,
    };
    let Some(key) = key else {
        debug!(sname = %parts.join("/"), "TGS-REQ: unknown principal (7)");
        return error(7, now, sname, None);
    };
    let cname = tgt.0.cname.0.clone();
    let session = random_key();
    let t = ticket(key, sname.clone(), &session, &cname, now);
    let part = EncTgsRepPart::from(rep_part(&session, &body.nonce.0, sname, now));
    let sealed = cipher().encrypt(&tgt_session, 8, &der(&part)).unwrap_or_default();
    der(&TgsRep::from(kdc_rep(13, cname, t, sealed)))
}
