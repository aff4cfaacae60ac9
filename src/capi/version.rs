//! Section "Version" of dspark.h.

use std::ffi::c_char;

/// `DSPARK_VERSION` of this library: major * 1000000 + minor * 1000 + patch.
pub const VERSION: u32 = parse(env!("CARGO_PKG_VERSION_MAJOR")) * 1_000_000
    + parse(env!("CARGO_PKG_VERSION_MINOR")) * 1_000
    + parse(env!("CARGO_PKG_VERSION_PATCH"));

const fn parse(s: &str) -> u32 {
    let b = s.as_bytes();
    let mut i = 0;
    let mut v = 0;
    while i < b.len() {
        v = v * 10 + (b[i] - b'0') as u32;
        i += 1;
    }
    v
}

/// The library version; see dspark.h.
#[unsafe(no_mangle)]
pub extern "C" fn dspark_version() -> u32 {
    VERSION
}

/// The library version as a string; see dspark.h.
#[unsafe(no_mangle)]
pub extern "C" fn dspark_version_string() -> *const c_char {
    const V: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");
    V.as_ptr().cast()
}
