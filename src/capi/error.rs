//! Section "Errors" of dspark.h: status codes, the thread-local last-error message, and the
//! guard that every export runs its body in.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// `dspark_status`: 0 is success, errors are negative (values as in dspark.h).
pub type dspark_status = c_int;

/// Success.
pub const DSPARK_OK: dspark_status = 0;
/// A required pointer argument was NULL.
pub const DSPARK_ERR_NULL: dspark_status = -1;
/// A struct's `size` field is wrong.
pub const DSPARK_ERR_SIZE: dspark_status = -2;
/// An argument is invalid.
pub const DSPARK_ERR_ARG: dspark_status = -3;
/// A layer, sequence or position is out of range.
pub const DSPARK_ERR_RANGE: dspark_status = -4;
/// Unknown KV format name.
pub const DSPARK_ERR_FORMAT: dspark_status = -5;
/// The handle is not a live cache.
pub const DSPARK_ERR_HANDLE: dspark_status = -6;
/// The sequence has no room left.
pub const DSPARK_ERR_FULL: dspark_status = -7;
/// A file could not be opened, read or written.
pub const DSPARK_ERR_IO: dspark_status = -8;
/// Saved data is truncated, corrupt or foreign.
pub const DSPARK_ERR_CORRUPT: dspark_status = -9;
/// Saved data is for another shape or format.
pub const DSPARK_ERR_MISMATCH: dspark_status = -10;
/// Saved data comes from a newer file-format version.
pub const DSPARK_ERR_VERSION: dspark_status = -11;
/// The output buffer is too small.
pub const DSPARK_ERR_BUFFER: dspark_status = -12;
/// An internal error (a caught panic).
pub const DSPARK_ERR_INTERNAL: dspark_status = -13;

/// Every status code with its name, in header order (tests compare it with dspark.h).
pub const STATUS_NAMES: [(dspark_status, &str); 14] = [
    (DSPARK_OK, "DSPARK_OK"),
    (DSPARK_ERR_NULL, "DSPARK_ERR_NULL"),
    (DSPARK_ERR_SIZE, "DSPARK_ERR_SIZE"),
    (DSPARK_ERR_ARG, "DSPARK_ERR_ARG"),
    (DSPARK_ERR_RANGE, "DSPARK_ERR_RANGE"),
    (DSPARK_ERR_FORMAT, "DSPARK_ERR_FORMAT"),
    (DSPARK_ERR_HANDLE, "DSPARK_ERR_HANDLE"),
    (DSPARK_ERR_FULL, "DSPARK_ERR_FULL"),
    (DSPARK_ERR_IO, "DSPARK_ERR_IO"),
    (DSPARK_ERR_CORRUPT, "DSPARK_ERR_CORRUPT"),
    (DSPARK_ERR_MISMATCH, "DSPARK_ERR_MISMATCH"),
    (DSPARK_ERR_VERSION, "DSPARK_ERR_VERSION"),
    (DSPARK_ERR_BUFFER, "DSPARK_ERR_BUFFER"),
    (DSPARK_ERR_INTERNAL, "DSPARK_ERR_INTERNAL"),
];

/// A failed call: the status it returns and the message `dspark_last_error` gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// A negative `DSPARK_ERR_*` code.
    pub code: dspark_status,
    /// What went wrong, for people.
    pub msg: String,
}

impl Error {
    /// An error with `code` and `msg`.
    pub fn new(code: dspark_status, msg: impl Into<String>) -> Error {
        debug_assert!(code < 0, "Error::new: {code} is not an error code");
        Error { code, msg: msg.into() }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", status_name(self.code), self.msg)
    }
}

impl std::error::Error for Error {}

/// The result of the safe layer under the C API.
pub type Result<T> = std::result::Result<T, Error>;

/// Shorthand for an `Err(Error::new(code, msg))`.
pub(crate) fn fail<T>(code: dspark_status, msg: impl Into<String>) -> Result<T> {
    Err(Error::new(code, msg))
}

/// The name of a status code.
#[must_use]
pub fn status_name(code: c_int) -> &'static str {
    STATUS_NAMES.iter().find(|(c, _)| *c == code).map_or("DSPARK_ERR_UNKNOWN", |(_, n)| n)
}

thread_local! {
    /// This thread's last error message (empty after a successful call).
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(msg: &str) {
    // Interior NULs cannot be represented in a C string; show them as spaces.
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    // `try_with`: during thread teardown the slot may be gone; the message is then dropped.
    let _ = LAST_ERROR.try_with(|e| *e.borrow_mut() = c);
}

fn clear_last_error() {
    let _ = LAST_ERROR.try_with(|e| {
        let mut e = e.borrow_mut();
        if !e.as_bytes().is_empty() {
            *e = CString::default();
        }
    });
}

/// Runs the body of the export `func`: a panic becomes `DSPARK_ERR_INTERNAL`, an error its
/// code; either sets this thread's last error, success clears it. Nothing unwinds into C.
pub(crate) fn guard(func: &str, body: impl FnOnce() -> Result<()>) -> dspark_status {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => {
            clear_last_error();
            DSPARK_OK
        }
        Ok(Err(e)) => {
            set_last_error(&format!("{func}: {}", e.msg));
            e.code
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            set_last_error(&format!("{func}: internal error: {what}"));
            DSPARK_ERR_INTERNAL
        }
    }
}

/// The message of the last failed call on this thread; see dspark.h.
#[unsafe(no_mangle)]
pub extern "C" fn dspark_last_error() -> *const c_char {
    static EMPTY: &std::ffi::CStr = c"";
    // The pointer stays valid until this thread's slot is next replaced, i.e. until the next
    // dspark_ call on this thread, as documented.
    LAST_ERROR.try_with(|e| e.borrow().as_ptr()).unwrap_or(EMPTY.as_ptr())
}

/// The name of a status code; see dspark.h.
#[unsafe(no_mangle)]
pub extern "C" fn dspark_status_name(status: c_int) -> *const c_char {
    // Static C strings, one per code, so the pointer lives for the whole process.
    const C_NAMES: [&std::ffi::CStr; 14] = [
        c"DSPARK_OK",
        c"DSPARK_ERR_NULL",
        c"DSPARK_ERR_SIZE",
        c"DSPARK_ERR_ARG",
        c"DSPARK_ERR_RANGE",
        c"DSPARK_ERR_FORMAT",
        c"DSPARK_ERR_HANDLE",
        c"DSPARK_ERR_FULL",
        c"DSPARK_ERR_IO",
        c"DSPARK_ERR_CORRUPT",
        c"DSPARK_ERR_MISMATCH",
        c"DSPARK_ERR_VERSION",
        c"DSPARK_ERR_BUFFER",
        c"DSPARK_ERR_INTERNAL",
    ];
    STATUS_NAMES
        .iter()
        .position(|(c, _)| *c == status)
        .map_or(c"DSPARK_ERR_UNKNOWN".as_ptr(), |i| C_NAMES[i].as_ptr())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_maps_panics_and_errors() {
        assert_eq!(guard("t", || Ok(())), DSPARK_OK);
        assert_eq!(guard("t", || fail(DSPARK_ERR_RANGE, "layer 99")), DSPARK_ERR_RANGE);
        // SAFETY: dspark_last_error returns a valid NUL-terminated string.
        let msg = unsafe { std::ffi::CStr::from_ptr(dspark_last_error()) };
        assert_eq!(msg.to_str().unwrap(), "t: layer 99");
        assert_eq!(guard("t", || panic!("boom")), DSPARK_ERR_INTERNAL);
        // SAFETY: as above.
        let msg = unsafe { std::ffi::CStr::from_ptr(dspark_last_error()) };
        assert!(msg.to_str().unwrap().contains("boom"));
        assert_eq!(guard("t", || Ok(())), DSPARK_OK);
        // SAFETY: as above.
        assert!(unsafe { std::ffi::CStr::from_ptr(dspark_last_error()) }.is_empty());
    }

    #[test]
    fn names_match_codes() {
        for (code, name) in STATUS_NAMES {
            // SAFETY: dspark_status_name returns a static NUL-terminated string.
            let c = unsafe { std::ffi::CStr::from_ptr(dspark_status_name(code)) };
            assert_eq!(c.to_str().unwrap(), name);
        }
        assert_eq!(status_name(-999), "DSPARK_ERR_UNKNOWN");
    }
}
