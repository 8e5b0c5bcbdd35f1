//! The CredSSP client sequence (MS-CSSP 3.1.5) over NTLM, as a state machine: bytes in, bytes
//! out, no sockets and no clock; the randomness it needs comes in an [`Entropy`].
//!
//! ```text
//! client                                         server
//! TSRequest{v6, negoTokens=NEGOTIATE}      ──▶
//!                                          ◀──   TSRequest{vN, negoTokens=CHALLENGE}
//! TSRequest{v6, negoTokens=AUTHENTICATE,
//!           pubKeyAuth, clientNonce}       ──▶
//!                                          ◀──   TSRequest{pubKeyAuth}  (logon accepted)
//!                                                or TSRequest{errorCode} / close (refused)
//! (stop: TSCredentials, the password itself, is never sent)
//! ```
//!
//! pubKeyAuth binds the logon to the server's TLS key: from version 5 on (the CVE-2018-0886
//! fix) it is SHA-256 over a magic string, the client nonce and the key; before, the key
//! itself. The server proves it holds the session key by answering with its own value,
//! which is verified here.

use std::fmt;

use ring::digest;
use zeroize::Zeroizing;

use super::{
    ntlm::{self, Challenge, NtlmError, Sealer},
    tsrequest::{self, DecodeError, TsRequest},
};
use crate::secret::Credential;

/// The TSRequest version this client speaks.
pub const CLIENT_VERSION: u32 = 6;

pub(crate) const CLIENT_SERVER_MAGIC: &[u8] = b"CredSSP Client-To-Server Binding Hash\0";
pub(crate) const SERVER_CLIENT_MAGIC: &[u8] = b"CredSSP Server-To-Client Binding Hash\0";

/// The account the logon is made for: names, and the NT hash (the password itself is not kept).
pub struct Identity {
    user: String,
    domain: String,
    nt_hash: Zeroizing<[u8; 16]>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("user", &self.user)
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// From explicit parts.
    pub fn new(user: &str, domain: &str, password: &str) -> Self {
        Identity {
            user: user.to_owned(),
            domain: domain.to_owned(),
            nt_hash: ntlm::nt_hash(password),
        }
    }

    /// From a credential: `DOMAIN\user` is split (its domain wins over the credential's),
    /// `user@domain` (UPN) goes as the user name with an empty domain (Windows resolves it),
    /// a plain `user` takes the credential's domain (may be empty).
    pub fn from_credential(c: &Credential) -> Self {
        let (user, domain) = split_account(&c.username, &c.domain);
        Identity {
            user,
            domain,
            nt_hash: ntlm::nt_hash(c.password.expose()),
        }
    }

    /// UserName as sent.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// DomainName as sent.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// `DOMAIN\user`, or the user alone when there is no domain.
    pub fn display(&self) -> String {
        if self.domain.is_empty() {
            self.user.clone()
        } else {
            format!("{}\\{}", self.domain, self.user)
        }
    }
}

/// (user, domain) for NTLM from the credential's forms.
pub fn split_account(username: &str, domain: &str) -> (String, String) {
    let u = username.trim();
    if let Some((d, user)) = u.split_once('\\') {
        (user.to_owned(), d.to_owned())
    } else if u.contains('@') {
        (u.to_owned(), String::new())
    } else {
        (u.to_owned(), domain.trim().to_owned())
    }
}

/// The random values one exchange uses.
pub struct Entropy {
    /// ChallengeFromClient.
    pub client_challenge: [u8; 8],
    /// The random session key (ExportedSessionKey).
    pub session_key: Zeroizing<[u8; 16]>,
    /// clientNonce.
    pub nonce: [u8; 32],
}

impl Entropy {
    /// Filled by `fill` (the caller's random source).
    pub fn from_fn(mut fill: impl FnMut(&mut [u8])) -> Self {
        let mut e = Entropy {
            client_challenge: [0; 8],
            session_key: Zeroizing::new([0; 16]),
            nonce: [0; 32],
        };
        fill(&mut e.client_challenge);
        fill(&mut e.session_key[..]);
        fill(&mut e.nonce);
        e
    }
}

/// What the server's answer to the NEGOTIATE says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerHello {
    /// The server's TSRequest version.
    pub credssp_version: u32,
    /// The CHALLENGE.
    pub challenge: Challenge,
}

/// Why the exchange stopped short of an accepted logon.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Not a TSRequest.
    NotTsRequest(DecodeError),
    /// A TSRequest, but the token in it is not the NTLM message expected, or NTLM cannot go on.
    Ntlm(NtlmError),
    /// The TSRequest carries no token where one was expected.
    NoToken,
    /// The server answered an errorCode (an NTSTATUS).
    ErrorCode {
        /// The server's TSRequest version.
        version: u32,
        /// The NTSTATUS.
        status: u32,
    },
    /// The answer to the AUTHENTICATE has neither pubKeyAuth nor errorCode.
    NoPubKeyAuth,
    /// The server's pubKeyAuth does not unseal or does not match our view of its TLS key.
    PubKeyAuthMismatch(&'static str),
    /// A method was called out of order.
    OutOfOrder,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::NotTsRequest(e) => write!(f, "{e}"),
            Refusal::Ntlm(e) => write!(f, "{e}"),
            Refusal::NoToken => f.write_str("TSRequest without an NTLM token"),
            Refusal::ErrorCode { status, .. } => write!(f, "errorCode 0x{status:08X}"),
            Refusal::NoPubKeyAuth => f.write_str("answer without pubKeyAuth or errorCode"),
            Refusal::PubKeyAuthMismatch(why) => write!(f, "server pubKeyAuth {why}"),
            Refusal::OutOfOrder => f.write_str("CredSSP step out of order"),
        }
    }
}

enum State {
    Initial,
    NegotiateSent,
    ChallengeReceived,
    AuthenticateSent,
    Finished,
}

/// One CredSSP client exchange.
pub struct Client {
    identity: Option<Identity>,
    entropy: Entropy,
    state: State,
    negotiate: Vec<u8>,
    challenge_raw: Vec<u8>,
    challenge: Option<Challenge>,
    server_version: u32,
    server_public_key: Vec<u8>,
    server_sealer: Option<Sealer>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("identity", &self.identity)
            .field("server_version", &self.server_version)
            .finish_non_exhaustive()
    }
}

/// Adds one to a little-endian integer (the pre-version-5 server answer: MS-CSSP 3.1.5).
pub(crate) fn increment_le(b: &mut [u8]) {
    for x in b {
        let (v, carry) = x.overflowing_add(1);
        *x = v;
        if !carry {
            break;
        }
    }
}

pub(crate) fn binding_hash(magic: &[u8], nonce: &[u8], public_key: &[u8]) -> Vec<u8> {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(magic);
    ctx.update(nonce);
    ctx.update(public_key);
    ctx.finish().as_ref().to_vec()
}

impl Client {
    /// A client; `identity` None stops after the CHALLENGE.
    pub fn new(identity: Option<Identity>, entropy: Entropy) -> Self {
        Client {
            identity,
            entropy,
            state: State::Initial,
            negotiate: Vec::new(),
            challenge_raw: Vec::new(),
            challenge: None,
            server_version: 0,
            server_public_key: Vec::new(),
            server_sealer: None,
        }
    }

    /// The identity the logon is made for.
    pub fn identity(&self) -> Option<&Identity> {
        self.identity.as_ref()
    }

    /// The version both sides use for pubKeyAuth: the lower of the two.
    pub fn effective_version(&self) -> u32 {
        self.server_version.min(CLIENT_VERSION)
    }

    /// The first TSRequest: version 6 with the NTLM NEGOTIATE.
    pub fn negotiate(&mut self) -> Vec<u8> {
        self.negotiate = ntlm::negotiate_message(ntlm::flags::CLIENT);
        self.state = State::NegotiateSent;
        tsrequest::encode(&TsRequest {
            version: CLIENT_VERSION,
            nego_tokens: vec![self.negotiate.clone()],
            ..TsRequest::default()
        })
    }

    /// Reads the server's answer to the NEGOTIATE.
    pub fn on_challenge(&mut self, bytes: &[u8]) -> Result<ServerHello, Refusal> {
        if !matches!(self.state, State::NegotiateSent) {
            return Err(Refusal::OutOfOrder);
        }
        self.state = State::Finished;
        let ts = tsrequest::decode(bytes).map_err(Refusal::NotTsRequest)?;
        if let Some(status) = ts.error_code {
            return Err(Refusal::ErrorCode {
                version: ts.version,
                status,
            });
        }
        let token = ts.nego_tokens.into_iter().next().ok_or(Refusal::NoToken)?;
        let challenge = ntlm::decode_challenge(&token).map_err(Refusal::Ntlm)?;
        self.server_version = ts.version;
        self.challenge_raw = token;
        self.challenge = Some(challenge.clone());
        self.state = State::ChallengeReceived;
        Ok(ServerHello {
            credssp_version: ts.version,
            challenge,
        })
    }

    /// The second TSRequest: AUTHENTICATE, pubKeyAuth bound to `server_public_key` and (from
    /// version 5) the client nonce. `now_filetime` is used only if the CHALLENGE has no
    /// timestamp.
    pub fn authenticate(&mut self, server_public_key: &[u8], now_filetime: u64) -> Result<Vec<u8>, Refusal> {
        let (Some(identity), Some(challenge), State::ChallengeReceived) =
            (self.identity.as_ref(), self.challenge.as_ref(), &self.state)
        else {
            return Err(Refusal::OutOfOrder);
        };
        self.state = State::Finished;
        let mut auth = ntlm::authenticate(&ntlm::AuthInput {
            negotiate: &self.negotiate,
            challenge_raw: &self.challenge_raw,
            challenge,
            user: &identity.user,
            domain: &identity.domain,
            workstation: "",
            nt_hash: &identity.nt_hash,
            client_challenge: self.entropy.client_challenge,
            random_session_key: *self.entropy.session_key,
            now_filetime,
        })
        .map_err(Refusal::Ntlm)?;
        let hashed = self.effective_version() >= 5;
        let plain = if hashed {
            binding_hash(CLIENT_SERVER_MAGIC, &self.entropy.nonce, server_public_key)
        } else {
            server_public_key.to_vec()
        };
        let pub_key_auth = auth.client.seal(&plain);
        self.server_public_key = server_public_key.to_vec();
        let message = std::mem::take(&mut auth.message);
        self.server_sealer = Some(auth.server);
        self.state = State::AuthenticateSent;
        Ok(tsrequest::encode(&TsRequest {
            version: CLIENT_VERSION,
            nego_tokens: vec![message],
            pub_key_auth: Some(pub_key_auth),
            client_nonce: hashed.then(|| self.entropy.nonce.to_vec()),
            ..TsRequest::default()
        }))
    }

    /// Reads the server's answer to the AUTHENTICATE: `Ok` when its pubKeyAuth proves the
    /// logon succeeded on the server holding the TLS key.
    pub fn on_answer(&mut self, bytes: &[u8]) -> Result<(), Refusal> {
        if !matches!(self.state, State::AuthenticateSent) {
            return Err(Refusal::OutOfOrder);
        }
        self.state = State::Finished;
        let ts = tsrequest::decode(bytes).map_err(Refusal::NotTsRequest)?;
        if let Some(status) = ts.error_code {
            return Err(Refusal::ErrorCode {
                version: ts.version,
                status,
            });
        }
        let token = ts.pub_key_auth.ok_or(Refusal::NoPubKeyAuth)?;
        let sealer = self.server_sealer.as_mut().ok_or(Refusal::OutOfOrder)?;
        let plain = sealer
            .unseal(&token)
            .map_err(|_| Refusal::PubKeyAuthMismatch("does not unseal with the session key"))?;
        let expected = if self.effective_version() >= 5 {
            binding_hash(SERVER_CLIENT_MAGIC, &self.entropy.nonce, &self.server_public_key)
        } else {
            let mut k = self.server_public_key.clone();
            increment_le(&mut k);
            k
        };
        if plain != expected {
            return Err(Refusal::PubKeyAuthMismatch(
                "does not match the TLS public key this connection saw",
            ));
        }
        Ok(())
    }
}

/// The server half, for tests only: enough of a CredSSP/NTLM acceptor to drive [`Client`]
/// through every outcome without a network.
#[cfg(test)]
pub(crate) mod test_server {
    use super::*;

    /// A CHALLENGE with the given names and timestamp.
    pub(crate) fn challenge(nb: &str, dns: &str, timestamp: Option<u64>) -> Vec<u8> {
        let pair = |id: u16, v: &[u8]| {
            let mut p = id.to_le_bytes().to_vec();
            p.extend_from_slice(&(v.len() as u16).to_le_bytes());
            p.extend_from_slice(v);
            p
        };
        let mut info = Vec::new();
        info.extend(pair(ntlm::av::NB_DOMAIN_NAME, &ntlm::utf16le("WORKGROUP")));
        info.extend(pair(ntlm::av::NB_COMPUTER_NAME, &ntlm::utf16le(nb)));
        if !dns.is_empty() {
            info.extend(pair(ntlm::av::DNS_COMPUTER_NAME, &ntlm::utf16le(dns)));
        }
        if let Some(t) = timestamp {
            info.extend(pair(ntlm::av::TIMESTAMP, &t.to_le_bytes()));
        }
        info.extend(pair(0, &[]));
        let mut m = ntlm::SIGNATURE.to_vec();
        m.extend_from_slice(&2u32.to_le_bytes());
        m.extend_from_slice(&[0, 0, 0, 0, 56, 0, 0, 0]);
        m.extend_from_slice(&0xe28a_8235u32.to_le_bytes());
        m.extend_from_slice(&[9, 8, 7, 6, 5, 4, 3, 2]);
        m.extend_from_slice(&[0; 8]);
        m.extend_from_slice(&(info.len() as u16).to_le_bytes());
        m.extend_from_slice(&(info.len() as u16).to_le_bytes());
        m.extend_from_slice(&56u32.to_le_bytes());
        m.extend_from_slice(&[10, 0, 0x63, 0x45, 0, 0, 0, 15]);
        m.extend_from_slice(&info);
        m
    }

    /// The server's view of an AUTHENTICATE: verifies NTProofStr with the password, recovers
    /// the session key and returns (client's pubKeyAuth plain text, server sealer).
    pub(crate) fn accept(
        auth_ts: &[u8],
        challenge_raw: &[u8],
        user: &str,
        domain: &str,
        password: &str,
    ) -> Option<(Vec<u8>, Option<Vec<u8>>, Sealer)> {
        let ts = tsrequest::decode(auth_ts).ok()?;
        let m = ts.nego_tokens.first()?;
        let ch = ntlm::decode_challenge(challenge_raw).ok()?;
        let f = |at: usize| -> Option<Vec<u8>> {
            let len = u16::from_le_bytes([m[at], m[at + 1]]) as usize;
            let off = u32::from_le_bytes([m[at + 4], m[at + 5], m[at + 6], m[at + 7]]) as usize;
            m.get(off..off + len).map(<[u8]>::to_vec)
        };
        let nt = f(20)?;
        let key = ntlm::ntowf_v2(&ntlm::nt_hash(password), user, domain);
        let proof = ntlm::nt_proof_str(&key, &ch.server_challenge, &nt[16..]);
        if proof[..] != nt[..16] {
            return None;
        }
        let kxk = ntlm::session_base_key(&key, &proof);
        let enc: [u8; 16] = f(52)?.try_into().ok()?;
        // RC4 is its own inverse.
        let exported = ntlm::encrypt_session_key(&kxk, &enc);
        let negotiated = u32::from_le_bytes([m[60], m[61], m[62], m[63]]);
        let mut client_side = Sealer::new(&exported, negotiated, ntlm::Direction::ClientToServer);
        let plain = client_side.unseal(ts.pub_key_auth.as_deref()?).ok()?;
        Some((
            plain,
            ts.client_nonce,
            Sealer::new(&exported, negotiated, ntlm::Direction::ServerToClient),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::{test_server::*, *};
    use crate::secret::Password;

    const KEY: &[u8] = b"\x30\x82\x01\x0a\x02\x82\x01\x01\x00\xc0\xffee-server-public-key";

    fn entropy() -> Entropy {
        let mut n = 0u8;
        Entropy::from_fn(|b| {
            for x in b {
                n = n.wrapping_add(1);
                *x = n;
            }
        })
    }

    fn hello(server_version: u32, ch: &[u8]) -> Vec<u8> {
        tsrequest::encode(&TsRequest {
            version: server_version,
            nego_tokens: vec![ch.to_vec()],
            ..TsRequest::default()
        })
    }

    #[test]
    fn account_forms() {
        assert_eq!(split_account("alice", "EXAMPLE"), ("alice".into(), "EXAMPLE".into()));
        assert_eq!(split_account("EXAMPLE\\alice", ""), ("alice".into(), "EXAMPLE".into()));
        assert_eq!(
            split_account("OTHER\\alice", "EXAMPLE"),
            ("alice".into(), "OTHER".into())
        );
        assert_eq!(
            split_account("alice@example.test", "EXAMPLE"),
            ("alice@example.test".into(), String::new())
        );
        let c = Credential {
            username: "EXAMPLE\\alice".into(),
            domain: String::new(),
            password: Password::new("canary-Secret-1".into()),
        };
        let id = Identity::from_credential(&c);
        assert_eq!(id.display(), "EXAMPLE\\alice");
        assert!(!format!("{id:?}").contains("canary"));
    }

    fn full_exchange(
        server_version: u32,
        answer: impl FnOnce(&[u8], Vec<u8>, Option<Vec<u8>>, Sealer) -> Vec<u8>,
    ) -> Result<(), Refusal> {
        let id = Identity::new("alice", "", "Alice-Pass-1");
        let mut c = Client::new(Some(id), entropy());
        let first = tsrequest::decode(&c.negotiate()).expect("negotiate");
        assert_eq!(first.version, 6);
        assert!(
            ntlm::decode_challenge(&first.nego_tokens[0]).is_err(),
            "a NEGOTIATE, not a CHALLENGE"
        );
        let ch = challenge("HOST1", "", Some(133_485_408_000_000_000));
        let h = c.on_challenge(&hello(server_version, &ch)).expect("hello");
        assert_eq!(h.credssp_version, server_version);
        assert_eq!(h.challenge.target_info.nb_computer, "HOST1");
        let auth = c.authenticate(KEY, 0).expect("authenticate");
        let (plain, nonce, sealer) = accept(&auth, &ch, "alice", "", "Alice-Pass-1").expect("server accepts");
        c.on_answer(&answer(&plain, nonce.clone().unwrap_or_default(), nonce, sealer))
    }

    fn reply(pka: Vec<u8>) -> Vec<u8> {
        tsrequest::encode(&TsRequest {
            version: 6,
            pub_key_auth: Some(pka),
            ..TsRequest::default()
        })
    }

    #[test]
    fn version_6_logon_is_bound_to_the_key_and_verified() {
        let r = full_exchange(6, |plain, nonce, sent_nonce, mut s| {
            assert_eq!(sent_nonce.map(|n| n.len()), Some(32));
            assert_eq!(plain, binding_hash(CLIENT_SERVER_MAGIC, &nonce, KEY));
            reply(s.seal(&binding_hash(SERVER_CLIENT_MAGIC, &nonce, KEY)))
        });
        assert_eq!(r, Ok(()));
    }

    #[test]
    fn version_4_logon_seals_the_key_itself() {
        let r = full_exchange(4, |plain, _, sent_nonce, mut s| {
            assert_eq!(sent_nonce, None);
            assert_eq!(plain, KEY);
            let mut k = KEY.to_vec();
            increment_le(&mut k);
            reply(s.seal(&k))
        });
        assert_eq!(r, Ok(()));
    }

    #[test]
    fn a_server_answer_for_another_key_is_refused() {
        let r = full_exchange(6, |_, nonce, _, mut s| {
            reply(s.seal(&binding_hash(SERVER_CLIENT_MAGIC, &nonce, b"interceptor's key")))
        });
        assert!(matches!(r, Err(Refusal::PubKeyAuthMismatch(_))), "{r:?}");
        let r = full_exchange(6, |_, nonce, _, _| {
            // Sealed with keys that are not the session's.
            let mut other = Sealer::new(&[1; 16], ntlm::flags::CLIENT, ntlm::Direction::ServerToClient);
            reply(other.seal(&binding_hash(SERVER_CLIENT_MAGIC, &nonce, KEY)))
        });
        assert!(matches!(r, Err(Refusal::PubKeyAuthMismatch(_))), "{r:?}");
    }

    #[test]
    fn error_codes_and_odd_answers() {
        let r = full_exchange(6, |_, _, _, _| {
            tsrequest::encode(&TsRequest {
                version: 6,
                error_code: Some(0xC000_006D),
                ..TsRequest::default()
            })
        });
        assert_eq!(
            r,
            Err(Refusal::ErrorCode {
                version: 6,
                status: 0xC000_006D
            })
        );
        let r = full_exchange(6, |_, _, _, _| {
            tsrequest::encode(&TsRequest {
                version: 6,
                ..TsRequest::default()
            })
        });
        assert_eq!(r, Err(Refusal::NoPubKeyAuth));
        let r = full_exchange(6, |_, _, _, _| b"\x03\x00\x00\x0b\x06\x80\x00\x00\x00\x00\x00".to_vec());
        assert!(matches!(r, Err(Refusal::NotTsRequest(_))));
    }

    #[test]
    fn a_wrong_password_does_not_verify_on_the_server() {
        let id = Identity::new("alice", "", "wrong");
        let mut c = Client::new(Some(id), entropy());
        c.negotiate();
        let ch = challenge("HOST1", "", None);
        c.on_challenge(&hello(6, &ch)).expect("hello");
        let auth = c.authenticate(KEY, 1).expect("authenticate");
        assert!(accept(&auth, &ch, "alice", "", "Alice-Pass-1").is_none());
    }

    #[test]
    fn challenge_errors_and_order() {
        let mut c = Client::new(None, entropy());
        assert_eq!(c.on_challenge(&[]), Err(Refusal::OutOfOrder));
        c.negotiate();
        let e = tsrequest::encode(&TsRequest {
            version: 6,
            error_code: Some(0xC000_015B),
            ..TsRequest::default()
        });
        assert!(matches!(
            c.on_challenge(&e),
            Err(Refusal::ErrorCode {
                status: 0xC000_015B,
                ..
            })
        ));
        let mut c = Client::new(None, entropy());
        c.negotiate();
        let none = tsrequest::encode(&TsRequest {
            version: 6,
            ..TsRequest::default()
        });
        assert_eq!(c.on_challenge(&none), Err(Refusal::NoToken));
        let mut c = Client::new(None, entropy());
        c.negotiate();
        assert!(matches!(
            c.on_challenge(&hello(6, b"NTLMSSP\0\x01\0\0\0")),
            Err(Refusal::Ntlm(_))
        ));
        // No identity: no AUTHENTICATE.
        let mut c = Client::new(None, entropy());
        c.negotiate();
        c.on_challenge(&hello(6, &challenge("H", "", None))).expect("hello");
        assert_eq!(c.authenticate(KEY, 0), Err(Refusal::OutOfOrder));
    }

    #[test]
    fn increment_carries() {
        let mut k = [0xff, 0xff, 0x01];
        increment_le(&mut k);
        assert_eq!(k, [0, 0, 2]);
    }
}
