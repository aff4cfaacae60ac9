//! DSpark's messages go where the host sends its own: through ggml's log callback (which
//! llama.cpp's `llama_log_set` also sets). DSpark never installs a callback of its own.

use std::ffi::CString;

use llama_cpp_sys_2 as ll;

fn log(level: ll::ggml_log_level, msg: &str) {
    let text = CString::new(format!("dspark: {msg}\n").replace('\0', " ")).expect("NULs replaced");
    let mut cb: ll::ggml_log_callback = None;
    let mut user = std::ptr::null_mut();
    // SAFETY: ggml_log_get writes the current callback and its user data into two valid
    // out-pointers; the callback takes a NUL-terminated string that outlives the call.
    unsafe {
        ll::ggml_log_get(&mut cb, &mut user);
        match cb {
            Some(f) => f(level, text.as_ptr(), user),
            None => eprint!("{}", text.to_string_lossy()),
        }
    }
}

/// A warning: DSpark falls back or degrades, and says why.
pub(crate) fn log_warn(msg: &str) {
    log(ll::GGML_LOG_LEVEL_WARN, msg);
}

/// An error: an operation failed.
pub(crate) fn log_error(msg: &str) {
    log(ll::GGML_LOG_LEVEL_ERROR, msg);
}
