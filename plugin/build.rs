//! Records build facts for `rdp-preflight --version`.
fn main() {
    let target = std::env::var("TARGET").unwrap_or_default();
    let profile = std::env::var("PROFILE").unwrap_or_default();
    println!("cargo:rustc-env=PREFLIGHT_BUILD_TARGET={target}");
    println!("cargo:rustc-env=PREFLIGHT_BUILD_PROFILE={profile}");
}
