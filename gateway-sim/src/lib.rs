//! A simulated RDP estate for exercising `rdp-preflight`: a fleet of loopback targets that each
//! fail in one specific, realistic way ([`targets`]), scenario files describing the fleet and the
//! sessions to play ([`scenario`]), a driver that plays those sessions against the plugin over
//! gRPC like a gateway ([`driver`]), and a closed-loop load generator ([`bench`]).

pub mod bench;
mod certs;
mod credssp;
pub mod demo;
pub mod directory;
pub mod driver;
pub mod kdc;
pub mod kerberos;
mod ntlm;
pub mod scenario;
pub mod targets;
mod weak_rsa;
mod wire;

pub use certs::CertError;
