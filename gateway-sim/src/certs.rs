//! The sim's own certificate authority and the certificate variants the targets present.
//!
//! Everything is generated at start with rcgen (ECDSA P-256) except `sha1`: rcgen and ring can't
//! sign with SHA-1, so that leaf and its issuing CA are committed fixtures made once with the
//! openssl CLI (fixtures/README.md). The fixture CA is part of the trust bundle
//! ([`SimCa::trust_pem`]) so the only thing wrong with the `sha1` certificate is its signature.

use std::{net::IpAddr, sync::Arc};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::ServerConfig;
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::{Duration, OffsetDateTime};

use crate::scenario::CertVariant;

/// The SHA-1 signed leaf (RSA-2048), issued by [`LEGACY_CA_PEM`].
const SHA1_CERT_PEM: &str = include_str!("../fixtures/sha1.pem");
/// Private key of [`SHA1_CERT_PEM`] (PKCS#8).
const SHA1_KEY_PEM: &str = include_str!("../fixtures/sha1.key");
/// The fixture CA that signed [`SHA1_CERT_PEM`].
const LEGACY_CA_PEM: &str = include_str!("../fixtures/legacy-ca.pem");

/// Name used by the `wrong_name` variant.
pub(crate) const WRONG_NAME: &str = "other.example.test";

/// A certificate could not be made or loaded.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// rcgen refused the parameters (e.g. a name that is not IA5).
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// A fixture PEM did not parse.
    #[error("fixture: {0}")]
    Fixture(#[from] rustls_pki_types::pem::Error),
    /// rustls refused the certificate or key.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// A certificate chain and its key, ready for a rustls server.
pub(crate) struct ServerCert {
    pub(crate) chain: Vec<CertificateDer<'static>>,
    pub(crate) key: PrivateKeyDer<'static>,
}

impl ServerCert {
    /// A rustls server configuration (ring provider, TLS 1.2 and 1.3) presenting this cert.
    pub(crate) fn server_config(self) -> Result<Arc<ServerConfig>, CertError> {
        let config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(self.chain, self.key)?;
        Ok(Arc::new(config))
    }
}

/// The sim's certificate authority.
pub(crate) struct SimCa {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl SimCa {
    /// Generates a fresh CA (ECDSA P-256, valid now-1d .. now+10y).
    pub(crate) fn generate() -> Result<SimCa, CertError> {
        let now = OffsetDateTime::now_utc();
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "gateway-sim");
        dn.push(DnType::CommonName, "gateway-sim CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = now - Duration::days(1);
        params.not_after = now + Duration::days(3650);
        let cert = params.self_signed(&key)?;
        Ok(SimCa {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// PEM bundle to configure as trust anchors: the sim CA, then the fixture CAs that issued
    /// the `sha1` and the RSA-1024 (`weak_rsa`) certificates.
    pub(crate) fn trust_pem(&self) -> String {
        format!("{}{}{}", self.pem, LEGACY_CA_PEM, crate::weak_rsa::CA_PEM)
    }

    /// Makes the certificate of `variant` for a target called `name` listening on `ip`.
    /// `Rotating` gives a `Valid`-like certificate with a fresh key on every call.
    pub(crate) fn issue(&self, name: &str, ip: IpAddr, variant: CertVariant) -> Result<ServerCert, CertError> {
        if variant == CertVariant::Sha1 {
            return Ok(ServerCert {
                chain: vec![CertificateDer::from_pem_slice(SHA1_CERT_PEM.as_bytes())?],
                key: PrivateKeyDer::from_pem_slice(SHA1_KEY_PEM.as_bytes())?,
            });
        }
        let now = OffsetDateTime::now_utc();
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        let cn = if variant == CertVariant::WrongName {
            WRONG_NAME
        } else {
            name
        };
        dn.push(DnType::CommonName, cn);
        params.distinguished_name = dn;
        params.subject_alt_names = if variant == CertVariant::WrongName {
            vec![SanType::DnsName(WRONG_NAME.try_into()?)]
        } else {
            vec![
                SanType::DnsName(name.try_into()?),
                SanType::DnsName("localhost".try_into()?),
                SanType::IpAddress(ip),
            ]
        };
        params.not_before = now - Duration::days(1);
        params.not_after = now + Duration::days(365);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        match variant {
            CertVariant::Expired => {
                params.not_before = now - Duration::days(366);
                params.not_after = now - Duration::days(1);
            }
            CertVariant::NotYetValid => {
                params.not_before = now + Duration::days(2);
            }
            CertVariant::ExpiringSoon => {
                params.not_after = now + Duration::days(3);
            }
            CertVariant::WrongEku => {
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            }
            CertVariant::SelfSignedCa => {
                // Like the certificate Windows makes for Remote Desktop, with CA:TRUE.
                params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
                params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyCertSign];
                params.use_authority_key_identifier_extension = false;
                let cert = params.self_signed(&key)?;
                return Ok(ServerCert {
                    chain: vec![cert.der().clone()],
                    key: pkcs8(&key),
                });
            }
            CertVariant::Valid | CertVariant::WrongName | CertVariant::Rotating | CertVariant::Sha1 => {}
        }
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(ServerCert {
            chain: vec![cert.der().clone()],
            key: pkcs8(&key),
        })
    }
}

fn pkcs8(key: &KeyPair) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))
}
