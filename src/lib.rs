//! DSpark: a compressed, paged KV cache and attention backend for llama.cpp.
//!
//! - `codec`: K/V row formats (rotation + low-bit quantization).
//! - `attn`: flash attention over compressed rows.
//! - `kv`: the paged compressed KV store, its memory budget and cold tier.
//! - `profile`: per-layer K/V widths and how calibration allocates them.
//! - `sched`: the transfer stream that reads cold pages while attention computes.
//! - `ggml`: the DSPARK0 ggml device that puts them into llama.cpp.
//! - `llama`: a small safe wrapper over llama.cpp's C API.
//! - `cli`: the `dspark` command line.

#![deny(unsafe_op_in_unsafe_fn)]

pub mod attn;
pub mod capi;
pub mod cli;
pub mod codec;
pub mod llama;
pub mod ggml;
pub mod kv;
pub mod profile;
pub mod sched;
