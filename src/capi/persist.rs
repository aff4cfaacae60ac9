//! Section "Cache persistence" of dspark.h: save and load, to memory and files. The format
//! and its checks are in `format.rs`.

use std::ffi::{c_char, c_void, CStr};
use std::io::Write;
use std::path::PathBuf;

use super::error::{dspark_status, fail, guard, DSPARK_ERR_BUFFER, DSPARK_ERR_IO, DSPARK_ERR_NULL};
use super::format::{self, IoSink, SliceSink};
use super::{handles, slice, slice_mut};
use crate::capi::cache::dspark_cache;

/// The exact saved size; see dspark.h.
///
/// # Safety
/// `out_size` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dspark_cache_save_size(cache: *const dspark_cache, out_size: *mut usize) -> dspark_status {
    guard("dspark_cache_save_size", || {
        let c = handles::get(cache)?;
        if out_size.is_null() {
            return fail(DSPARK_ERR_NULL, "out_size is NULL");
        }
        let n = c.with_pages(|st| format::size(&c.shape, st))?;
        // SAFETY: non-null and writable (caller).
        unsafe { out_size.write_unaligned(n) };
        Ok(())
    })
}

/// Saves into a buffer; see dspark.h.
///
/// # Safety
/// `buf` is NULL or points to `cap` writable bytes; `out_written` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dspark_cache_save_mem(cache: *const dspark_cache, buf: *mut c_void, cap: usize, out_written: *mut usize) -> dspark_status {
    guard("dspark_cache_save_mem", || {
        let c = handles::get(cache)?;
        if buf.is_null() {
            return fail(DSPARK_ERR_NULL, "buf is NULL");
        }
        let n = c.with_pages(|st| -> super::Result<usize> {
            let n = format::size(&c.shape, st);
            if cap < n {
                return fail(DSPARK_ERR_BUFFER, format!("buffer of {cap} bytes; the cache needs {n}"));
            }
            // SAFETY: buf holds cap >= n writable bytes (caller).
            let out = unsafe { slice_mut(buf.cast::<u8>(), n, "buf") }?;
            let mut sink = SliceSink { buf: out, pos: 0 };
            format::write(&c.shape, st, n - format::HEADER - format::TRAILER, &mut sink);
            debug_assert_eq!(sink.pos, n);
            Ok(n)
        })??;
        if !out_written.is_null() {
            // SAFETY: non-null and writable (caller).
            unsafe { out_written.write_unaligned(n) };
        }
        Ok(())
    })
}

/// Loads from a buffer; see dspark.h.
///
/// # Safety
/// `buf` is NULL or points to `len` readable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dspark_cache_load_mem(cache: *mut dspark_cache, buf: *const c_void, len: usize) -> dspark_status {
    guard("dspark_cache_load_mem", || {
        let c = handles::get(cache)?;
        // SAFETY: buf holds len readable bytes (caller).
        let bytes = unsafe { slice(buf.cast::<u8>(), len, "buf") }?;
        let st = format::parse(bytes, &c.shape, c.window)?;
        c.replace(st)
    })
}

/// A path argument.
///
/// # Safety
/// `p` is NULL or a NUL-terminated string.
unsafe fn path_arg(p: *const c_char) -> super::Result<PathBuf> {
    if p.is_null() {
        return fail(DSPARK_ERR_NULL, "path is NULL");
    }
    // SAFETY: non-null and NUL-terminated (caller).
    let s = unsafe { CStr::from_ptr(p) };
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        Ok(PathBuf::from(std::ffi::OsStr::from_bytes(s.to_bytes())))
    }
    #[cfg(not(unix))]
    s.to_str().map(PathBuf::from).or_else(|_| fail(super::error::DSPARK_ERR_ARG, "path is not UTF-8"))
}

/// Saves to a file; see dspark.h.
///
/// # Safety
/// `path` is NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dspark_cache_save_file(cache: *const dspark_cache, path: *const c_char) -> dspark_status {
    guard("dspark_cache_save_file", || {
        let c = handles::get(cache)?;
        // SAFETY: NULL or NUL-terminated (caller).
        let path = unsafe { path_arg(path) }?;
        let mut tmp = path.clone().into_os_string();
        tmp.push(format!(".tmp{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let io = |what: &str, e: std::io::Error| super::Error::new(DSPARK_ERR_IO, format!("{what} {}: {e}", path.display()));
        let file = std::fs::File::create(&tmp).map_err(|e| io("cannot create a temporary file beside", e))?;
        let mut sink = IoSink { w: std::io::BufWriter::with_capacity(1 << 20, file), err: None };
        c.with_pages(|st| {
            let n = format::size(&c.shape, st);
            format::write(&c.shape, st, n - format::HEADER - format::TRAILER, &mut sink);
        })?;
        let done = match sink.err {
            Some(e) => Err(e),
            None => sink.w.into_inner().map_err(std::io::IntoInnerError::into_error).and_then(|mut f| {
                f.flush()?;
                f.sync_all()
            }),
        };
        let done = done.and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = done {
            let _ = std::fs::remove_file(&tmp);
            return Err(io("cannot write", e));
        }
        Ok(())
    })
}

/// Loads from a file; see dspark.h.
///
/// # Safety
/// `path` is NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dspark_cache_load_file(cache: *mut dspark_cache, path: *const c_char) -> dspark_status {
    guard("dspark_cache_load_file", || {
        let c = handles::get(cache)?;
        // SAFETY: NULL or NUL-terminated (caller).
        let path = unsafe { path_arg(path) }?;
        let bytes = std::fs::read(&path).map_err(|e| super::Error::new(DSPARK_ERR_IO, format!("cannot read {}: {e}", path.display())))?;
        let st = format::parse(&bytes, &c.shape, c.window)?;
        c.replace(st)
    })
}
