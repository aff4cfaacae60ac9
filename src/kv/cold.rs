//! The cold tier's storage: a spill file that holds the pages a KV memory budget moved out of
//! RAM.
//!
//! The file is created already unlinked (`O_TMPFILE`; else a named file removed right after
//! it is opened), so nothing is left behind when the process dies. Reads and writes bypass
//! the page cache (`O_DIRECT`), so that a cold read costs what the disk costs and the cache
//! does not quietly hold the "cold" bytes in RAM after all; where the file system refuses
//! `O_DIRECT` (tmpfs), the file is used through the page cache and every range read is
//! dropped from it afterwards (`posix_fadvise(DONTNEED)`), and a warning says so once.
//!
//! `O_DIRECT` wants offsets, lengths and buffer addresses aligned to the device's block; all
//! three are multiples of [`BLOCK`] here ([`AlignedBuf`]).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Alignment and granularity of cold-tier I/O (bytes).
pub const BLOCK: usize = 4096;

/// Where cold pages go. [`SpillFile`] in use; tests put a store that fails on command here.
pub trait ColdStore: Send + Sync {
    /// Writes `data` at byte `off` (both multiples of [`BLOCK`], `data` from an [`AlignedBuf`]).
    fn write_at(&self, off: u64, data: &[u8]) -> io::Result<()>;
    /// Reads `out.len()` bytes at `off` (same alignment rules); a short read is an error.
    fn read_at(&self, off: u64, out: &mut [u8]) -> io::Result<()>;
    /// What the store is, for messages and the statistics (e.g. the spill file's folder).
    fn describe(&self) -> String;
    /// Allocates disk space for `len` bytes at `off` before they are written, so that pages
    /// written later and at different times still lie in one extent (default: nothing).
    fn reserve(&self, _off: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
}

/// A byte buffer whose start is aligned to [`BLOCK`] (what `O_DIRECT` asks of memory), made
/// without unsafe code: a larger vector, used from its first aligned byte on.
pub struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// `len` zero bytes, rounded up to whole blocks.
    pub fn new(len: usize) -> AlignedBuf {
        let len = len.next_multiple_of(BLOCK);
        let raw = vec![0u8; len + BLOCK];
        let start = raw.as_ptr().align_offset(BLOCK);
        AlignedBuf { raw, start, len }
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

/// The spill file of one DSpark device (one KV configuration).
pub struct SpillFile {
    file: File,
    dir: PathBuf,
    /// Whether the file was opened with `O_DIRECT`.
    direct: bool,
}

/// Names for the fallback when `O_TMPFILE` is refused (one per file made by this process).
static NAMED: AtomicU64 = AtomicU64::new(0);

impl SpillFile {
    /// Creates an unlinked spill file in `dir`, with `O_DIRECT` where the file system takes it.
    ///
    /// # Errors
    /// If `dir` is not a writable folder.
    pub fn create(dir: &Path) -> io::Result<SpillFile> {
        let file = match Self::open(dir, true) {
            Ok(f) if Self::direct_works(&f) => return Ok(SpillFile { file: f, dir: dir.to_path_buf(), direct: true }),
            _ => Self::open(dir, false)?,
        };
        Ok(SpillFile { file, dir: dir.to_path_buf(), direct: false })
    }

    fn open(dir: &Path, direct: bool) -> io::Result<File> {
        let direct_flag = if direct { libc::O_DIRECT } else { 0 };
        let tmp = OpenOptions::new().read(true).write(true).mode(0o600).custom_flags(libc::O_TMPFILE | direct_flag).open(dir);
        match tmp {
            Ok(f) => Ok(f),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && direct => Err(e),
            Err(_) => {
                // No O_TMPFILE here: a named file, removed as soon as it is open.
                let n = NAMED.fetch_add(1, Ordering::Relaxed);
                let path = dir.join(format!(".dspark-spill-{}-{n}", std::process::id()));
                let f = OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).custom_flags(direct_flag).open(&path)?;
                std::fs::remove_file(&path)?;
                Ok(f)
            }
        }
    }

    /// Some file systems accept the `O_DIRECT` flag at open and refuse the I/O: try one block.
    fn direct_works(f: &File) -> bool {
        let mut b = AlignedBuf::new(BLOCK);
        f.write_all_at(b.as_slice(), 0).is_ok() && f.read_exact_at(b.as_mut_slice(), 0).is_ok()
    }

    /// Whether reads bypass the page cache through `O_DIRECT` (else through `DONTNEED`).
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Drops a byte range from the page cache (the non-`O_DIRECT` fallback).
    fn drop_cached(&self, off: u64, len: usize) {
        // SAFETY: posix_fadvise only reads its integer arguments; the descriptor is open.
        unsafe { libc::posix_fadvise(self.file.as_raw_fd(), off as libc::off_t, len as libc::off_t, libc::POSIX_FADV_DONTNEED) };
    }
}

impl ColdStore for SpillFile {
    fn write_at(&self, off: u64, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, off)?;
        if !self.direct {
            // Written pages must leave RAM too: flush them, then drop them from the cache.
            self.file.sync_data()?;
            self.drop_cached(off, data.len());
        }
        Ok(())
    }

    fn read_at(&self, off: u64, out: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(out, off)?;
        if !self.direct {
            self.drop_cached(off, out.len());
        }
        Ok(())
    }

    /// `fallocate`: without it, blocks are placed in the order pages go cold, which scatters a
    /// store's region across the disk; a 4 MiB read then became dozens of small ones and ran
    /// at 0.77 GB/s of the disk's 1.8 at depth 32768.
    fn reserve(&self, off: u64, len: u64) -> io::Result<()> {
        // SAFETY: fallocate only reads its integer arguments; the descriptor is open.
        let r = unsafe { libc::fallocate(self.file.as_raw_fd(), 0, off as libc::off_t, len as libc::off_t) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn describe(&self) -> String {
        format!("spill file in {} ({})", self.dir.display(), if self.direct { "O_DIRECT" } else { "page cache, DONTNEED after each read" })
    }
}

/// A cold store in memory that fails every call while `fail` is set: the stand-in for a full
/// disk or an I/O error in the fault tests (of this crate and of programs that embed it).
#[derive(Default, Clone)]
pub struct MemCold {
    pub data: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    pub fail: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl ColdStore for MemCold {
    fn write_at(&self, off: u64, data: &[u8]) -> io::Result<()> {
        if self.fail.load(Ordering::Relaxed) {
            return Err(io::Error::new(io::ErrorKind::StorageFull, "injected: no space left on device"));
        }
        let mut d = self.data.lock().unwrap_or_else(|e| e.into_inner());
        let end = off as usize + data.len();
        if d.len() < end {
            d.resize(end, 0);
        }
        d[off as usize..end].copy_from_slice(data);
        Ok(())
    }

    fn read_at(&self, off: u64, out: &mut [u8]) -> io::Result<()> {
        if self.fail.load(Ordering::Relaxed) {
            return Err(io::Error::other("injected: I/O error"));
        }
        let d = self.data.lock().unwrap_or_else(|e| e.into_inner());
        let src = d.get(off as usize..off as usize + out.len()).ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        out.copy_from_slice(src);
        Ok(())
    }

    fn describe(&self) -> String {
        "memory (test cold store)".into()
    }
}

/// The rate at which the disk under `dir` reads a spill file: `bytes` written, then read
/// back in 1 MiB requests, bypassing the page cache as the cold tier does. Bytes per second.
///
/// # Errors
/// If the file cannot be made, written or read.
pub fn measure_read_rate(dir: &Path, bytes: usize) -> io::Result<f64> {
    const REQ: usize = 1 << 20;
    let f = SpillFile::create(dir)?;
    let mut buf = AlignedBuf::new(REQ);
    buf.as_mut_slice().iter_mut().enumerate().for_each(|(i, x)| *x = i as u8);
    let n = bytes.div_ceil(REQ);
    for i in 0..n {
        f.write_at((i * REQ) as u64, buf.as_slice())?;
    }
    f.file.sync_data()?;
    let t = std::time::Instant::now();
    for i in 0..n {
        f.read_at((i * REQ) as u64, buf.as_mut_slice())?;
    }
    Ok((n * REQ) as f64 / t.elapsed().as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buffers_are_aligned_whole_blocks() {
        for len in [1, BLOCK, BLOCK + 1, 10 * BLOCK - 3] {
            let b = AlignedBuf::new(len);
            assert_eq!(b.as_slice().as_ptr() as usize % BLOCK, 0);
            assert_eq!(b.as_slice().len(), len.next_multiple_of(BLOCK));
        }
    }

    #[test]
    fn a_spill_file_round_trips_blocks_and_leaves_no_name() {
        let dir = std::env::temp_dir().join(format!("dspark-cold-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = SpillFile::create(&dir).unwrap();
        let mut w = AlignedBuf::new(3 * BLOCK);
        w.as_mut_slice().iter_mut().enumerate().for_each(|(i, x)| *x = (i * 7 % 251) as u8);
        f.write_at(2 * BLOCK as u64, w.as_slice()).unwrap();
        let mut r = AlignedBuf::new(3 * BLOCK);
        f.read_at(2 * BLOCK as u64, r.as_mut_slice()).unwrap();
        assert_eq!(r.as_slice(), w.as_slice());
        // Past the end: a short read is an error, never zeros.
        let mut past = AlignedBuf::new(BLOCK);
        assert!(f.read_at(100 * BLOCK as u64, past.as_mut_slice()).is_err());
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "the spill file must have no name");
        std::fs::remove_dir(&dir).unwrap();
    }
}
