//! The C API that `include/dspark.h` declares. The header is the documentation of every
//! function; this module maps its sections one to one:
//!
//! | dspark.h section | file |
//! |---|---|
//! | Version | `version.rs` |
//! | Errors | `error.rs` (status codes, thread-local last error, the panic guard) |
//! | Registration into llama.cpp | `device.rs` |
//! | Cache | `cache.rs` (exports), `store.rs` (the safe cache) |
//! | Cache persistence | `persist.rs` (exports), `format.rs` (the saved form) |
//! | (not in dspark.h) ggml plugin entry points | `plugin.rs` (feature `plugin`) |
//!
//! Raw pointers stay in this file and the export files: each export converts its
//! arguments once (null, alignment and `size` checks) into references and slices, then
//! calls the safe layer inside [`error::guard`], so no panic unwinds into C. Cache handles
//! are tokens looked up in a table of live caches (see [`handles`]), never dereferenced.
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]
#![allow(non_camel_case_types)]

mod cache;
mod device;
pub mod error;
pub mod format;
mod persist;
pub mod plugin;
pub mod store;
mod version;

pub use cache::{dspark_attn_params, dspark_cache, dspark_cache_params};
pub use device::{dspark_config, dspark_stats};
pub use error::{dspark_status, Error, Result};

use std::ffi::{c_char, CStr};

use error::{fail, DSPARK_ERR_ARG, DSPARK_ERR_NULL, DSPARK_ERR_SIZE};

/// A struct whose first field is `size_t size` and that every bit pattern is valid for
/// (integers, floats and raw pointers only), so it can be copied from and to C bytewise.
///
/// # Safety
/// Implementors must be `#[repr(C)]`, start with a `usize` size field, and contain only
/// fields for which any bit pattern is a valid value.
pub(crate) unsafe trait Versioned: Copy {
    /// The smallest `size` accepted (the struct as API version 1 defined it).
    const MIN_SIZE: usize;
    /// The sizes of the struct in the API versions between the first and this one (their
    /// later fields take the defaults).
    const PAST_SIZES: &'static [usize] = &[];
    /// The struct's defaults, `size` set.
    fn defaults() -> Self;
    /// Bytes of this library's struct that a caller's struct of `size` bytes holds as whole
    /// fields (what [`write_versioned`] writes). The default suits structs whose `MIN_SIZE`
    /// is their full size; output structs that accept smaller sizes round down to a field.
    fn whole_fields(size: usize) -> usize {
        size.min(std::mem::size_of::<Self>())
    }
}

/// Reads a caller's versioned struct: `size` must be `T::MIN_SIZE` (the first version's
/// struct, whose later fields take their defaults) or at least this library's size; bytes
/// beyond this library's struct must be zero (fields of a newer header that we cannot honour).
///
/// # Safety
/// `p` is NULL or points to a readable struct whose first field is a `size_t` equal to its
/// readable size in bytes.
pub(crate) unsafe fn read_versioned<T: Versioned>(p: *const T, what: &str) -> Result<T> {
    // SAFETY: the caller guarantees a struct starting with a size_t at p when non-null.
    let size = unsafe { read_size::<T>(p, what) }?;
    let ours = std::mem::size_of::<T>();
    if size < ours && size != T::MIN_SIZE && !T::PAST_SIZES.contains(&size) {
        // Between the first version's struct and this one: a field would be cut.
        return fail(DSPARK_ERR_SIZE, format!("{what}->size is {size}: not the size of any version of this struct ({:?} or {ours})", [T::MIN_SIZE].iter().chain(T::PAST_SIZES).collect::<Vec<_>>()));
    }
    if size > ours {
        // SAFETY: the caller guarantees `size` readable bytes at p.
        let extra = unsafe { std::slice::from_raw_parts(p.cast::<u8>().add(ours), size - ours) };
        if extra.iter().any(|&b| b != 0) {
            return fail(DSPARK_ERR_SIZE, format!("{what}->size is {size}: fields beyond this library's {ours} bytes are set"));
        }
    }
    let mut out = T::defaults();
    // SAFETY: min(size, ours) bytes are readable at p (caller) and writable in `out`; any
    // bit pattern is a valid T (Versioned's contract); the regions do not overlap.
    unsafe { std::ptr::copy_nonoverlapping(p.cast::<u8>(), std::ptr::addr_of_mut!(out).cast::<u8>(), size.min(ours)) };
    Ok(out)
}

/// Writes `value` into a caller's versioned struct: only the fields that fit whole in the
/// caller's `size` are written (a field cut by `size` is left untouched), bytes beyond this
/// library's struct are zeroed, `size` is kept.
///
/// # Safety
/// `p` is NULL or points to a writable struct whose first field is an initialised `size_t`
/// equal to its writable size in bytes.
pub(crate) unsafe fn write_versioned<T: Versioned>(p: *mut T, value: &T, what: &str) -> Result<()> {
    // SAFETY: the caller guarantees an initialised size_t at p when it is non-null.
    let size = unsafe { read_size::<T>(p.cast_const(), what) }?;
    let ours = std::mem::size_of::<T>();
    let dst = p.cast::<u8>();
    let skip = std::mem::size_of::<usize>();
    let whole = T::whole_fields(size).clamp(skip, ours);
    // SAFETY: 1. `size` bytes at p are writable (caller); we write bytes skip..whole (whole
    // <= min(size, ours)) from `value` and zero bytes ours..size. 2. `value` is a distinct
    // Rust object.
    unsafe {
        std::ptr::copy_nonoverlapping(std::ptr::from_ref(value).cast::<u8>().add(skip), dst.add(skip), whole - skip);
        if size > ours {
            std::ptr::write_bytes(dst.add(ours), 0, size - ours);
        }
    }
    Ok(())
}

/// The `size` field of a caller's versioned struct, checked against `T::MIN_SIZE`.
///
/// # Safety
/// `p` is NULL or points to an initialised `size_t`.
unsafe fn read_size<T: Versioned>(p: *const T, what: &str) -> Result<usize> {
    if p.is_null() {
        return fail(DSPARK_ERR_NULL, format!("{what} is NULL"));
    }
    if !p.cast::<usize>().is_aligned() {
        return fail(DSPARK_ERR_ARG, format!("{what} is misaligned"));
    }
    // SAFETY: p is non-null and aligned, and the caller guarantees a size_t there.
    let size = unsafe { p.cast::<usize>().read() };
    if size < T::MIN_SIZE || size > isize::MAX as usize {
        return fail(DSPARK_ERR_SIZE, format!("{what}->size is {size}; set it to sizeof (at least {})", T::MIN_SIZE));
    }
    Ok(size)
}

/// A slice from a C pointer and an element count; `len == 0` gives an empty slice
/// whatever the pointer.
///
/// # Safety
/// If `len > 0` and `p` is non-null, `p` must point to `len` readable, initialised `T`s that
/// are not written during `'a`.
pub(crate) unsafe fn slice<'a, T>(p: *const T, len: usize, what: &str) -> Result<&'a [T]> {
    if len == 0 {
        return Ok(&[]);
    }
    check_ptr(p, len, what)?;
    // SAFETY: non-null, aligned, size checked; the caller guarantees validity.
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// A mutable slice from a C pointer; `len == 0` gives an empty slice.
///
/// # Safety
/// If `len > 0` and `p` is non-null, `p` must point to `len` writable `T`s that nothing else
/// reads or writes during `'a`.
pub(crate) unsafe fn slice_mut<'a, T>(p: *mut T, len: usize, what: &str) -> Result<&'a mut [T]> {
    if len == 0 {
        return Ok(&mut []);
    }
    check_ptr(p, len, what)?;
    // SAFETY: non-null, aligned, size checked; the caller guarantees exclusive validity.
    Ok(unsafe { std::slice::from_raw_parts_mut(p, len) })
}

fn check_ptr<T>(p: *const T, len: usize, what: &str) -> Result<()> {
    if p.is_null() {
        return fail(DSPARK_ERR_NULL, format!("{what} is NULL"));
    }
    if !p.is_aligned() {
        return fail(DSPARK_ERR_ARG, format!("{what} is not aligned for its element type"));
    }
    if len.checked_mul(std::mem::size_of::<T>()).is_none_or(|b| b > isize::MAX as usize) {
        return fail(DSPARK_ERR_ARG, format!("{what}: {len} elements is too large"));
    }
    Ok(())
}

/// Byte range of a slice, to refuse outputs that overlap inputs.
pub(crate) fn span<T>(s: &[T]) -> std::ops::Range<usize> {
    let a = s.as_ptr() as usize;
    a..a + std::mem::size_of_val(s)
}

/// Whether two byte ranges overlap (empty ranges never do).
pub(crate) fn overlaps(a: &std::ops::Range<usize>, b: &std::ops::Range<usize>) -> bool {
    !a.is_empty() && !b.is_empty() && a.start < b.end && b.start < a.end
}

/// A C string argument as UTF-8; `NULL` gives `None`.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string readable during `'a`.
pub(crate) unsafe fn opt_str<'a>(p: *const c_char, what: &str) -> Result<Option<&'a str>> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: non-null, and the caller guarantees a NUL-terminated string.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str().map(Some).or_else(|_| fail(error::DSPARK_ERR_FORMAT, format!("{what} is not UTF-8")))
}

/// The table of live caches: a `dspark_cache_t *` is a token (a unique, never reused,
/// non-null multiple of 16) that maps to its cache here. A call looks the token up and
/// clones the `Arc` under the lock, so a delete on another thread only drops the table's
/// reference; a stale or foreign token is an error, never a dereference.
pub(crate) mod handles {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex, OnceLock};

    use super::cache::dspark_cache;
    use super::error::{fail, Result, DSPARK_ERR_HANDLE, DSPARK_ERR_NULL};
    use super::store::Cache;

    static NEXT: AtomicUsize = AtomicUsize::new(1);

    fn table() -> std::sync::MutexGuard<'static, HashMap<usize, Arc<Cache>>> {
        static LIVE: OnceLock<Mutex<HashMap<usize, Arc<Cache>>>> = OnceLock::new();
        LIVE.get_or_init(Mutex::default).lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds a cache; returns its token.
    pub fn insert(c: Cache) -> *mut dspark_cache {
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        let token = id.checked_mul(16).expect("cache handles exhausted");
        table().insert(token, Arc::new(c));
        // A token, not an address: the C side only stores it and passes it back.
        token as *mut dspark_cache
    }

    /// The cache behind a token.
    pub fn get(p: *const dspark_cache) -> Result<Arc<Cache>> {
        if p.is_null() {
            return fail(DSPARK_ERR_NULL, "cache is NULL");
        }
        match table().get(&(p as usize)) {
            Some(c) => Ok(Arc::clone(c)),
            None => fail(DSPARK_ERR_HANDLE, format!("{p:p} is not a live cache (deleted, or not from dspark_cache_new)")),
        }
    }

    /// Removes a token; the cache is freed when the last call using it returns.
    pub fn remove(p: *const dspark_cache) -> Result<()> {
        match table().remove(&(p as usize)) {
            Some(_) => Ok(()),
            None => fail(DSPARK_ERR_HANDLE, format!("{p:p} is not a live cache (deleted twice, or not from dspark_cache_new)")),
        }
    }
}
