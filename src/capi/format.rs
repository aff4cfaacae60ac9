//! The saved form of a standalone cache (file-format versions 2 and 3), in safe Rust.
//!
//! All integers little-endian. A 64-byte header, the payload, then a CRC-32 (IEEE) of every
//! byte before it:
//!
//! | offset | field |
//! |---:|---|
//! | 0 | magic `DSPARKKV` |
//! | 8 | u32 file-format version (2: one format; 3: per-layer widths) |
//! | 12 | u32 header bytes (64) |
//! | 16 | u32 n_layer, n_head_kv, n_head, head_dim, max_tokens, n_seq_max |
//! | 40 | u8 K bits, u8 V bits (0 = f16; 0xFF in version 3), u16 cells per page (64) |
//! | 44 | u32 reserved (0) |
//! | 48 | u64 payload bytes |
//! | 56 | u64 reserved (0) |
//!
//! A cache whose layers all have the same widths is written as version 2, as before per-layer
//! widths existed; one with a profile of mixed widths as version 3, whose payload starts with
//! u8 K bits, u8 V bits for each layer. Then, in both: for each sequence, for each layer:
//! u32 length, u32 hole count, then (u32 p0, u32 p1) per hole. Then for each layer, for K then V, for each sequence: u32 count of
//! allocated pages, then per allocated page, in increasing page order: u32 page index, u8
//! tag (1 f16, 2 packed) and the page's bytes as stored (f16 values, or the codec's packed
//! rows). Pages are saved as stored, so a loaded cache gives bit-identical attention; only
//! allocated pages are written, so an image costs what the cache holds, whatever its
//! `max_tokens` (version 1 wrote one tag per possible page, and is not read any more).
//!
//! [`parse`] checks everything (length, magic, version, CRC, shape, then every field of the
//! payload: lengths, holes, page counts, indices and tags, every f16 value finite, every packed
//! row's scale and multipliers in the range the codec writes) and builds a new [`State`];
//! nothing is changed until it returns `Ok`. The CRC only proves that the bytes are what
//! some writer wrote; the payload checks refuse what no correct writer writes.
#![forbid(unsafe_code)]

use half::f16;

use super::error::{fail, Result, DSPARK_ERR_CORRUPT, DSPARK_ERR_MISMATCH, DSPARK_ERR_VERSION};
use super::store::{Lane, Shape, State};
use crate::codec::{layout, Quant};
use crate::kv::{KvStore, PageView, F16_MAX, PAGE};

/// Largest packed-row scale a correct writer produces, with margin. Stored values are within
/// the f16 range (`KvStore::write_row` saturates) and the rotation is orthonormal (signs, then
/// a normalised Hadamard transform over blocks of at most 4096 values), so a rotated value is
/// at most its block's L2 norm, sqrt(4096) x 65504 = 64 x 65504; the row scale is the largest
/// group step over 127, and a step is at most that over 2^(bits-1) >= 2: at most 64 x 65504 /
/// (2 x 127) = 16505, 16640 once rounded up to bf16. 2^16 leaves margin, and keeps every decoded value
/// (scale x 127 x 128 at most) and every product with a finite query far from overflow.
pub const MAX_ROW_SCALE: f32 = 65536.0;

const _: () = assert!(64.0 * F16_MAX / (2.0 * 127.0) * 1.01 < MAX_ROW_SCALE);

/// First bytes of every saved cache.
pub const MAGIC: &[u8; 8] = b"DSPARKKV";
/// The newest file-format version written and read (version 2 is also read, and written for
/// caches of one format).
pub const VERSION: u32 = 3;
/// Version of a cache whose layers all have the same widths.
const VERSION_UNIFORM: u32 = 2;
/// Header bytes in versions 2 and 3.
pub const HEADER: usize = 64;
/// Trailer (CRC-32) bytes.
pub const TRAILER: usize = 4;

const TAG_F16: u8 = 1;
const TAG_PACKED: u8 = 2;

/// Where serialised bytes go.
pub trait Sink {
    /// Appends bytes.
    fn put(&mut self, b: &[u8]);

    /// Appends f16 values, little-endian.
    fn put_f16(&mut self, v: &[f16]) {
        let mut buf = [0u8; 512];
        for chunk in v.chunks(256) {
            for (o, x) in buf.chunks_exact_mut(2).zip(chunk) {
                o.copy_from_slice(&x.to_bits().to_le_bytes());
            }
            self.put(&buf[..chunk.len() * 2]);
        }
    }
}

/// Counts bytes only.
#[derive(Debug, Default)]
pub struct Counter(pub usize);

impl Sink for Counter {
    fn put(&mut self, b: &[u8]) {
        self.0 += b.len();
    }
    fn put_f16(&mut self, v: &[f16]) {
        self.0 += v.len() * 2;
    }
}

impl Sink for Vec<u8> {
    fn put(&mut self, b: &[u8]) {
        self.extend_from_slice(b);
    }
}

/// Writes into a slice that is known to be large enough.
#[derive(Debug)]
pub struct SliceSink<'a> {
    /// Destination.
    pub buf: &'a mut [u8],
    /// Bytes written.
    pub pos: usize,
}

impl Sink for SliceSink<'_> {
    fn put(&mut self, b: &[u8]) {
        self.buf[self.pos..self.pos + b.len()].copy_from_slice(b);
        self.pos += b.len();
    }
}

/// Writes into an `io::Write`, keeping the first error.
#[derive(Debug)]
pub struct IoSink<W: std::io::Write> {
    /// Destination.
    pub w: W,
    /// The first write error, after which nothing more is written.
    pub err: Option<std::io::Error>,
}

impl<W: std::io::Write> Sink for IoSink<W> {
    fn put(&mut self, b: &[u8]) {
        if self.err.is_none() {
            if let Err(e) = self.w.write_all(b) {
                self.err = Some(e);
            }
        }
    }
}

/// Passes bytes on and hashes them.
struct Crc<'a, S: Sink> {
    inner: &'a mut S,
    hasher: crc32fast::Hasher,
}

impl<S: Sink> Sink for Crc<'_, S> {
    fn put(&mut self, b: &[u8]) {
        self.hasher.update(b);
        self.inner.put(b);
    }
}

fn put_u32(s: &mut impl Sink, x: usize) {
    s.put(&u32::try_from(x).expect("shape fields fit u32 (checked at creation)").to_le_bytes());
}

fn bits(q: Option<Quant>) -> u8 {
    q.map_or(0, |q| u8::try_from(q.bits()).expect("bits fit u8"))
}

/// Each layer's K and V bits (0 = f16).
fn layer_bits(shape: &Shape) -> Vec<[u8; 2]> {
    (0..shape.n_layer).map(|l| [bits(shape.quant(l, true)), bits(shape.quant(l, false))]).collect()
}

fn payload(shape: &Shape, st: &State, s: &mut impl Sink) {
    if !shape.is_uniform() {
        for b in layer_bits(shape) {
            s.put(&b);
        }
    }
    for lanes in &st.lanes {
        for lane in lanes {
            put_u32(s, lane.len);
            put_u32(s, lane.holes.len());
            for &(a, b) in &lane.holes {
                put_u32(s, a);
                put_u32(s, b);
            }
        }
    }
    for lk in &st.layers {
        for store in [&lk.k, &lk.v] {
            for seq in 0..shape.n_seq_max {
                let span = store.pages_allocated_span(seq);
                let allocated = || (0..span).filter(|&p| !matches!(store.page(seq, p), PageView::Empty));
                put_u32(s, allocated().count());
                for p in allocated() {
                    put_u32(s, p);
                    match store.page(seq, p) {
                        PageView::Empty => unreachable!("filtered out"),
                        PageView::F16(d) => {
                            s.put(&[TAG_F16]);
                            s.put_f16(d);
                        }
                        PageView::Packed(d) => {
                            s.put(&[TAG_PACKED]);
                            s.put(d);
                        }
                        // Saved as f16 (the file format has no window codes); a store with
                        // window codes encodes them again when it reads the file back.
                        PageView::Window(d) => {
                            s.put(&[TAG_F16]);
                            s.put_f16(&store.window_codec().expect("a window page has window codes").decode_page(d));
                        }
                    }
                }
            }
        }
    }
}

/// Bytes [`write`] produces for this state.
#[must_use]
pub fn size(shape: &Shape, st: &State) -> usize {
    let mut c = Counter::default();
    payload(shape, st, &mut c);
    HEADER + c.0 + TRAILER
}

/// Serialises `st` into `sink` (header, payload, CRC). `payload_len` must be the payload's
/// size (`size() - HEADER - TRAILER`).
///
/// # Panics
/// If a shape field does not fit in a u32 (shapes are checked when a cache is created).
pub fn write(shape: &Shape, st: &State, payload_len: usize, sink: &mut impl Sink) {
    let mut s = Crc { inner: sink, hasher: crc32fast::Hasher::new() };
    let mut h = [0u8; HEADER];
    h[0..8].copy_from_slice(MAGIC);
    let version = if shape.is_uniform() { VERSION_UNIFORM } else { VERSION };
    h[8..12].copy_from_slice(&version.to_le_bytes());
    h[12..16].copy_from_slice(&u32::try_from(HEADER).expect("64").to_le_bytes());
    for (i, v) in [shape.n_layer, shape.n_head_kv, shape.n_head, shape.head_dim, shape.max_tokens, shape.n_seq_max].into_iter().enumerate() {
        h[16 + 4 * i..20 + 4 * i].copy_from_slice(&u32::try_from(v).expect("checked at creation").to_le_bytes());
    }
    let [k, v] = if shape.is_uniform() { layer_bits(shape)[0] } else { [0xFF; 2] };
    (h[40], h[41]) = (k, v);
    h[42..44].copy_from_slice(&u16::try_from(PAGE).expect("PAGE fits u16").to_le_bytes());
    h[48..56].copy_from_slice(&(payload_len as u64).to_le_bytes());
    s.put(&h);
    payload(shape, st, &mut s);
    let crc = s.hasher.finalize();
    sink.put(&crc.to_le_bytes());
}

/// A reader over the payload; every read is bounds-checked.
struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

fn corrupt<T>(msg: impl Into<String>) -> Result<T> {
    fail(DSPARK_ERR_CORRUPT, msg)
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        match self.b.get(self.pos..self.pos.saturating_add(n)) {
            Some(s) => {
                self.pos += n;
                Ok(s)
            }
            None => corrupt(format!("payload ends early at byte {}", HEADER + self.pos)),
        }
    }

    fn left(&self) -> usize {
        self.b.len() - self.pos
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<usize> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Checks `bytes` and builds the state it describes, for a cache of `shape` with `window`.
///
/// # Errors
/// `DSPARK_ERR_CORRUPT` (truncated, foreign, bad CRC, inconsistent payload),
/// `DSPARK_ERR_VERSION` (newer file format) or `DSPARK_ERR_MISMATCH` (other shape/format).
pub fn parse(bytes: &[u8], shape: &Shape, window: usize) -> Result<State> {
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return corrupt("not a DSpark cache (bad magic)");
    }
    if bytes.len() < HEADER + TRAILER {
        return corrupt(format!("truncated: {} bytes, shorter than the header", bytes.len()));
    }
    let version = le_u32(bytes, 8);
    if version > VERSION {
        return fail(DSPARK_ERR_VERSION, format!("file-format version {version} is newer than this library's ({VERSION})"));
    }
    if version == 1 {
        return fail(
            DSPARK_ERR_VERSION,
            format!("file-format version 1 (DSpark before C API version 2) is no longer read; this library reads version {VERSION}"),
        );
    }
    if !(version == VERSION || version == VERSION_UNIFORM) || le_u32(bytes, 12) as usize != HEADER {
        return corrupt(format!("bad header (version {version}, header size {})", le_u32(bytes, 12)));
    }
    let payload_len = le_u64(bytes, 48);
    let expected = (HEADER as u64 + TRAILER as u64).checked_add(payload_len);
    match expected {
        Some(e) if e == bytes.len() as u64 => {}
        Some(e) if e > bytes.len() as u64 => return corrupt(format!("truncated: {} bytes of {e}", bytes.len())),
        _ => return corrupt(format!("{} bytes, but the header announces {payload_len} bytes of payload", bytes.len())),
    }
    let body = bytes.len() - TRAILER;
    let crc = le_u32(bytes, body);
    if crc32fast::hash(&bytes[..body]) != crc {
        return corrupt("checksum mismatch (the data is damaged)");
    }
    // The data is what was written; now it must be ours.
    let dims: Vec<usize> = (0..6).map(|i| le_u32(bytes, 16 + 4 * i) as usize).collect();
    let ours = [shape.n_layer, shape.n_head_kv, shape.n_head, shape.head_dim, shape.max_tokens, shape.n_seq_max];
    if dims != ours || u16::from_le_bytes([bytes[42], bytes[43]]) as usize != PAGE {
        return fail(DSPARK_ERR_MISMATCH, format!("saved for n_layer/n_head_kv/n_head/head_dim/max_tokens/n_seq_max {dims:?}; this cache is {ours:?}"));
    }
    let mut r = Reader { b: &bytes[HEADER..body], pos: 0 };
    let saved: Vec<[u8; 2]> = if version == VERSION_UNIFORM {
        vec![[bytes[40], bytes[41]]; shape.n_layer]
    } else {
        r.take(2 * shape.n_layer)?.chunks_exact(2).map(|b| [b[0], b[1]]).collect()
    };
    let our_bits = layer_bits(shape);
    if saved != our_bits {
        let show = |b: &[[u8; 2]]| b.iter().map(|[k, v]| format!("k{k}v{v}")).collect::<Vec<_>>().join(" ");
        return fail(DSPARK_ERR_MISMATCH, format!("saved with K/V bits per layer {}; this cache has {} (0 = f16)", show(&saved), show(&our_bits)));
    }
    let mut st = State::empty(shape, window)?;
    for lanes in &mut st.lanes {
        for lane in lanes.iter_mut() {
            *lane = read_lane(&mut r, shape)?;
        }
    }
    let f16_vals = shape.page_bytes(None) / 2;
    for (layer, lk) in st.layers.iter_mut().enumerate() {
        for (store, q) in [(&mut lk.k, shape.quant(layer, true)), (&mut lk.v, shape.quant(layer, false))] {
            let packed = q.map(|q| (q, shape.page_bytes(Some(q))));
            for seq in 0..shape.n_seq_max {
                let len = st.lanes[seq][layer].len;
                read_pages(&mut r, store, seq, len, shape, f16_vals, packed)?;
                store.set_high_water(seq, len);
            }
        }
    }
    if r.pos != r.b.len() {
        return corrupt(format!("{} unexpected bytes after the payload", r.b.len() - r.pos));
    }
    Ok(st)
}

/// One lane: its length and holes (sorted, disjoint, not touching, below the length).
fn read_lane(r: &mut Reader, shape: &Shape) -> Result<Lane> {
    let len = r.u32()?;
    let n_holes = r.u32()?;
    // Holes neither overlap nor touch, so at most every other position starts one; each
    // takes 8 bytes, so a count the input cannot hold is refused before any allocation.
    if len > shape.max_tokens || n_holes > len.div_ceil(2) || n_holes * 8 > r.left() {
        return corrupt(format!("lane of {len} tokens with {n_holes} holes"));
    }
    let mut holes = Vec::with_capacity(n_holes);
    let mut prev_end = None;
    for _ in 0..n_holes {
        let (a, b) = (r.u32()?, r.u32()?);
        if a >= b || b > len || prev_end.is_some_and(|e| a <= e) {
            return corrupt(format!("bad hole [{a}, {b}) in a lane of {len} tokens"));
        }
        prev_end = Some(b);
        holes.push((a, b));
    }
    Ok(Lane { len, holes })
}

/// The allocated pages of one stream of a store, whose lane holds `len` tokens.
fn read_pages(
    r: &mut Reader,
    store: &mut KvStore,
    seq: usize,
    len: usize,
    shape: &Shape,
    f16_vals: usize,
    packed: Option<(Quant, usize)>,
) -> Result<()> {
    let limit = len.div_ceil(PAGE);
    let n_pages = r.u32()?;
    if n_pages > limit {
        return corrupt(format!("{n_pages} pages for a sequence of {len} tokens"));
    }
    let mut vals = vec![f16::ZERO; f16_vals];
    let mut prev = None;
    for _ in 0..n_pages {
        let p = r.u32()?;
        if p >= limit || prev.is_some_and(|q| p <= q) {
            return corrupt(format!("page {p} out of order or beyond a sequence of {len} tokens"));
        }
        prev = Some(p);
        let view = match r.u8()? {
            TAG_F16 => {
                let b = r.take(f16_vals * 2)?;
                for (o, x) in vals.iter_mut().zip(b.chunks_exact(2)) {
                    *o = f16::from_bits(u16::from_le_bytes([x[0], x[1]]));
                    if !o.is_finite() {
                        return corrupt(format!("non-finite f16 value in page {p}"));
                    }
                }
                PageView::F16(&vals)
            }
            TAG_PACKED => match packed {
                Some((q, n)) => {
                    let b = r.take(n)?;
                    check_packed_rows(b, q, shape.head_dim).or_else(|e| corrupt(format!("page {p}: {e}")))?;
                    PageView::Packed(b)
                }
                None => return corrupt("packed page in an f16 store"),
            },
            t => return corrupt(format!("bad page tag {t}")),
        };
        if let Err(e) = store.set_page(seq, p, view) {
            return corrupt(e);
        }
    }
    Ok(())
}

/// Checks every row of a packed page: a row scale that is a non-negative finite bf16 up to
/// [`MAX_ROW_SCALE`], and group multipliers in -127..=127 (the codec never writes -128).
/// Codes need no check: every bit pattern is a code.
fn check_packed_rows(page: &[u8], q: Quant, head_dim: usize) -> std::result::Result<(), String> {
    let rb = layout::row_bytes(q.bits(), head_dim);
    let groups = head_dim / layout::GROUP;
    for (i, row) in page.chunks_exact(rb).enumerate() {
        let s = layout::row_scale(row);
        // The sign bit refuses -0 and negatives (NaN included); then NaN, +inf and big values.
        if row[1] & 0x80 != 0 || s.is_nan() || s > MAX_ROW_SCALE {
            return Err(format!("row {i} has scale {s}, outside 0..={MAX_ROW_SCALE}"));
        }
        if let Some(g) = row[layout::HEADER..layout::HEADER + groups].iter().position(|&m| m == 0x80) {
            return Err(format!("row {i} has group multiplier -128 in group {g}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::RowCodec;

    /// The row checks never refuse what the codec writes for values in the f16 range, down
    /// to the worst case: a row that the rotation concentrates into one value of 64 x 65504.
    #[test]
    fn packed_row_checks_accept_every_row_the_codec_writes() {
        for d in [32, 64, 96, 128, 4096] {
            let mut worst = vec![0.0f32; d];
            worst[0] = (crate::codec::block_len(d) as f32).sqrt() * F16_MAX;
            crate::codec::unrotate(&mut worst);
            assert!(worst.iter().all(|x| x.abs() <= F16_MAX * 1.0001), "d {d}");
            let worst: Vec<f32> = worst.iter().map(|x| x.clamp(-F16_MAX, F16_MAX)).collect();
            let alternating: Vec<f32> = (0..d).map(|i| if i % 3 == 0 { -F16_MAX } else { F16_MAX }).collect();
            let tiny: Vec<f32> = (0..d).map(|i| 1e-7 * i as f32).collect();
            for q in Quant::ALL {
                let c = RowCodec::new(q, d).unwrap();
                let mut row = vec![0u8; c.row_bytes()];
                for x in [&worst, &alternating, &tiny, &vec![0.0; d]] {
                    c.encode(x, &mut row);
                    check_packed_rows(&row, q, d).unwrap_or_else(|e| panic!("d {d}, {q:?}: {e}"));
                }
            }
        }
    }

    #[test]
    fn packed_row_checks_refuse_bad_scales_and_multipliers() {
        let q = Quant::Q4;
        let c = RowCodec::new(q, 64).unwrap();
        let mut row = vec![0u8; c.row_bytes()];
        c.encode(&[1.0; 64], &mut row);
        assert!(check_packed_rows(&row, q, 64).is_ok());
        let bf16 = |x: f32| u16::try_from(x.to_bits() >> 16).unwrap().to_le_bytes();
        for (scale, ok) in [(MAX_ROW_SCALE, true), (MAX_ROW_SCALE * 1.01, false), (-0.0, false), (-1.0, false), (f32::INFINITY, false), (f32::NAN, false)] {
            let mut r = row.clone();
            r[..2].copy_from_slice(&bf16(scale));
            assert_eq!(check_packed_rows(&r, q, 64).is_ok(), ok, "scale {scale}");
        }
        let mut r = row.clone();
        r[3] = 0x80;
        assert!(check_packed_rows(&r, q, 64).is_err());
        r[3] = 0x81; // -127
        assert!(check_packed_rows(&r, q, 64).is_ok());
    }
}
