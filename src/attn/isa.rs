//! Run-time choice of the kernel set: the tile pipeline of `fast.rs` compiled for AVX-512,
//! for AVX2+FMA, and portably. Detection runs once; `DSPARK_FORCE_ISA=portable|avx2|avx512`
//! pins a set (a set the CPU lacks falls back to the best available one).

use super::fast::{self, Ctx, Item, Partial};
use super::kernels::Portable;
use std::sync::OnceLock;

/// Processes one work item.
pub(crate) type ItemFn = for<'c, 'p, 'a, 'b> fn(&'c Ctx<'p, 'a, 'b>, &'c Item) -> Partial;

/// One instruction set's kernels.
#[derive(Debug)]
pub(crate) struct Kernels {
    pub name: &'static str,
    pub item: ItemFn,
}

static KERNELS: OnceLock<Kernels> = OnceLock::new();

fn item_portable(ctx: &Ctx, it: &Item) -> Partial {
    fast::run_item::<Portable>(ctx, it)
}

/// The kernel set called `name`, if this CPU can run it.
pub(crate) fn by_name(name: &str) -> Option<Kernels> {
    match name {
        "portable" => Some(Kernels { name: "portable", item: item_portable }),
        #[cfg(target_arch = "x86_64")]
        "avx512" if x86::has_avx512_vnni() => {
            // SAFETY: `has_avx512_vnni` checked at run time every feature the set enables.
            Some(unsafe { x86::avx512_vnni_kernels() })
        }
        #[cfg(target_arch = "x86_64")]
        "avx512" if x86::has_avx512() => {
            // SAFETY: `has_avx512` checked at run time every feature `avx512_kernels` enables.
            Some(unsafe { x86::avx512_kernels() })
        }
        #[cfg(target_arch = "x86_64")]
        "avx2" if x86::has_avx2() => {
            // SAFETY: `has_avx2` checked at run time every feature `avx2_kernels` enables.
            Some(unsafe { x86::avx2_kernels() })
        }
        _ => None,
    }
}

/// Names of the kernel sets this CPU can run, best first.
pub fn available_isas() -> Vec<&'static str> {
    ["avx512", "avx2", "portable"].into_iter().filter(|n| by_name(n).is_some()).collect()
}

fn select() -> Kernels {
    let force = std::env::var("DSPARK_FORCE_ISA").unwrap_or_default();
    let order: &[&str] = match force.as_str() {
        "portable" | "scalar" => &["portable"],
        "avx2" => &["avx2", "portable"],
        _ => &["avx512", "avx2", "portable"],
    };
    order.iter().find_map(|n| by_name(n)).unwrap_or(Kernels { name: "portable", item: item_portable })
}

/// The kernel set in use.
pub(crate) fn kernels() -> &'static Kernels {
    KERNELS.get_or_init(select)
}

/// Name of the instruction set the attention kernels run on: `avx512`, `avx2` or `portable`.
#[must_use]
pub fn active_isa() -> &'static str {
    kernels().name
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Ctx, Item, Kernels, Partial};
    use crate::attn::fast;
    use crate::attn::kernels::Flavor;
    use crate::attn::fast::DecodeJob;
    use crate::attn::x86 as k;
    use crate::attn::x86_decode as kd;
    use crate::codec::RowCodec;
    use half::f16;

    pub fn has_avx512() -> bool {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && has_avx2()
    }

    pub fn has_avx512_vnni() -> bool {
        has_avx512() && is_x86_feature_detected!("avx512vnni")
    }

    pub fn has_avx2() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
    }

    /// AVX-512 flavor. Only `item_avx512` instantiates the pipeline with it, and
    /// `item_avx512` is only reachable through `avx512_kernels`, which runs after detection.
    #[derive(Clone, Copy, Debug)]
    struct Avx512;

    impl Flavor for Avx512 {
        #[inline(always)]
        fn fma(a: f32, b: f32, c: f32) -> f32 {
            a.mul_add(b, c)
        }
        #[inline(always)]
        fn decode_packed(codec: &RowCodec, data: &[u8], out: &mut [f32]) {
            // SAFETY: this flavor only runs inside `item_avx512` (see the type's docs), so
            // the CPU has every feature the decoder enables.
            unsafe { k::decode_packed_avx512(codec, data, out) }
        }
        #[inline(always)]
        fn f16_rows(src: &[f16], out: &mut [f32]) {
            // SAFETY: as in `decode_packed`.
            unsafe { k::f16_rows_avx512(src, out) }
        }
        #[inline(always)]
        fn scores(q: &[f32], m: usize, k: &[f32], nj: usize, d: usize, s: &mut [f32], stride: usize) {
            // SAFETY: as in `decode_packed`.
            unsafe { k::scores_avx512(q, m, k, nj, d, s, stride) }
        }
        #[inline(always)]
        fn accumulate_rows(p: &[f32], stride: usize, v: &[f32], nj: usize, d: usize, m: usize, acc: &mut [f32]) {
            // SAFETY: as in `decode_packed`.
            unsafe { k::accumulate_avx512(p, stride, v, nj, d, m, acc) }
        }
        const WIDE: bool = true;
        #[inline(always)]
        fn scores_t(qt: &[f32], mp: usize, kt: &[f32], nj: usize, d: usize, st: &mut [f32]) {
            // SAFETY: as in `decode_packed`.
            unsafe { k::scores_t_avx512(qt, mp, kt, nj, d, st) }
        }
        #[inline(always)]
        fn accumulate_t(pt: &[f32], mp: usize, v: &[f32], nj: usize, d: usize, m: usize, acc: &mut [f32]) {
            // SAFETY: as in `decode_packed`.
            unsafe { k::accumulate_t_avx512(pt, mp, v, nj, d, m, acc) }
        }
        #[inline(always)]
        fn exp_rows(x: &mut [f32], sub: &[f32], acc: &mut [f32]) {
            // SAFETY: as in `decode_packed`.
            unsafe { k::exp_rows_avx512(x, sub, acc) }
        }
    }

    /// AVX-512 with VNNI: the AVX-512 flavor plus the integer packed decode kernel. Only
    /// `item_avx512_vnni` instantiates the pipeline with it (reached after detection).
    #[derive(Clone, Copy, Debug)]
    struct Avx512Vnni;

    impl Flavor for Avx512Vnni {
        #[inline(always)]
        fn fma(a: f32, b: f32, c: f32) -> f32 {
            a.mul_add(b, c)
        }
        #[inline(always)]
        fn decode_packed(codec: &RowCodec, data: &[u8], out: &mut [f32]) {
            Avx512::decode_packed(codec, data, out);
        }
        #[inline(always)]
        fn f16_rows(src: &[f16], out: &mut [f32]) {
            Avx512::f16_rows(src, out);
        }
        #[inline(always)]
        fn scores(q: &[f32], m: usize, k: &[f32], nj: usize, d: usize, s: &mut [f32], stride: usize) {
            Avx512::scores(q, m, k, nj, d, s, stride);
        }
        #[inline(always)]
        fn accumulate_rows(p: &[f32], stride: usize, v: &[f32], nj: usize, d: usize, m: usize, acc: &mut [f32]) {
            Avx512::accumulate_rows(p, stride, v, nj, d, m, acc);
        }
        const WIDE: bool = true;
        #[inline(always)]
        fn scores_t(qt: &[f32], mp: usize, kt: &[f32], nj: usize, d: usize, st: &mut [f32]) {
            Avx512::scores_t(qt, mp, kt, nj, d, st);
        }
        #[inline(always)]
        fn accumulate_t(pt: &[f32], mp: usize, v: &[f32], nj: usize, d: usize, m: usize, acc: &mut [f32]) {
            Avx512::accumulate_t(pt, mp, v, nj, d, m, acc);
        }
        #[inline(always)]
        fn exp_rows(x: &mut [f32], sub: &[f32], acc: &mut [f32]) {
            Avx512::exp_rows(x, sub, acc);
        }
        const PACKED_DECODE: bool = true;
        #[inline(always)]
        fn packed_decode(job: &DecodeJob, max: &mut [f32], sum: &mut [f32], acc: &mut [f32], plain: &mut [f32]) {
            // SAFETY: this flavor only runs inside `item_avx512_vnni`, reached after
            // `has_avx512_vnni` (see the type's docs).
            unsafe { kd::decode_packed_avx512(job, max, sum, acc, plain) }
        }
    }

    /// AVX2+FMA+F16C flavor; only `item_avx2` instantiates the pipeline with it.
    #[derive(Clone, Copy, Debug)]
    struct Avx2;

    impl Flavor for Avx2 {
        #[inline(always)]
        fn fma(a: f32, b: f32, c: f32) -> f32 {
            a.mul_add(b, c)
        }
        #[inline(always)]
        fn decode_packed(codec: &RowCodec, data: &[u8], out: &mut [f32]) {
            // SAFETY: this flavor only runs inside `item_avx2`, reached after detection.
            unsafe { k::decode_packed_avx2(codec, data, out) }
        }
        #[inline(always)]
        fn f16_rows(src: &[f16], out: &mut [f32]) {
            // SAFETY: as in `decode_packed`.
            unsafe { k::f16_rows_avx2(src, out) }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    fn item_avx512(ctx: &Ctx, it: &Item) -> Partial {
        fast::run_item::<Avx512>(ctx, it)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    fn item_avx512_vnni(ctx: &Ctx, it: &Item) -> Partial {
        fast::run_item::<Avx512Vnni>(ctx, it)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn item_avx2(ctx: &Ctx, it: &Item) -> Partial {
        fast::run_item::<Avx2>(ctx, it)
    }

    /// The AVX-512 set. Inside a function with the same features the safe `#[target_feature]`
    /// function coerces to a plain `fn` pointer, so no caller can reach it unchecked.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub fn avx512_kernels() -> Kernels {
        Kernels { name: "avx512", item: item_avx512 }
    }

    /// The AVX-512 VNNI set (see [`avx512_kernels`]).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub fn avx512_vnni_kernels() -> Kernels {
        Kernels { name: "avx512", item: item_avx512_vnni }
    }

    /// The AVX2+FMA set (see [`avx512_kernels`]).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn avx2_kernels() -> Kernels {
        Kernels { name: "avx2", item: item_avx2 }
    }
}
