//! Shared helpers for the integration tests.

pub mod plugin;
pub mod shadow;
pub mod slapd;
