//! rdp-preflight: answers, before an RDP session starts, whether the target and the target
//! account's credential will work, and if not, exactly why.
//!
//! See `ARCHITECTURE.md` at the top of the repository for the code map and invariants.

pub mod cause;
pub mod deadline;
pub mod report;
pub mod secret;
pub mod config;
pub mod policy;
pub mod probe;
