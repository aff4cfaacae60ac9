//! ggml's RPC backend (`ggml-rpc`, built into the linked llama.cpp with `GGML_RPC=ON`): a
//! server that offers a device to other machines, and the remote devices a client adds, as
//! llama.cpp's `rpc-server` and `--rpc` do. Its functions are found through ggml's backend
//! registry, so the same code serves the static build and a host that loads backends.
//!
//! The protocol has no authentication: a server runs any graph a client sends it.

use std::ffi::{c_char, c_void, CStr, CString};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use llama_cpp_sys_2 as ll;

type StartServer = unsafe extern "C" fn(*const c_char, *const c_char, usize, usize, *mut ll::ggml_backend_dev_t);
type AddServer = unsafe extern "C" fn(*const c_char) -> ll::ggml_backend_reg_t;

/// How long a client waits to reach a server before it says so.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Makes a ggml abort (ggml-rpc's answer to a lost server: "Remote RPC server crashed or
/// returned malformed response") print its message and exit with status 1, instead of
/// attaching a debugger for a backtrace and dying of SIGABRT. For the `dspark` program.
fn exit_on_abort() {
    /// # Safety
    /// ggml callback: `msg` is a NUL-terminated message valid for the call.
    unsafe extern "C" fn on_abort(msg: *const c_char) {
        // SAFETY: ggml passes its NUL-terminated message.
        let msg = unsafe { CStr::from_ptr(msg) }.to_string_lossy();
        eprintln!("dspark: error: {msg} (an RPC server was lost; the generation cannot go on)");
        // SAFETY: ends the process without running destructors or atexit handlers, which
        // another thread may be inside; ggml would abort() here anyway.
        unsafe { libc::_exit(1) }
    }
    // SAFETY: installs a callback with the signature ggml expects; it never returns.
    unsafe { ll::ggml_set_abort_callback(Some(on_abort)) };
}

/// Opens (and closes) a TCP connection to `endpoint`.
fn reach(endpoint: &str) -> std::io::Result<()> {
    let mut last = std::io::Error::other("the name has no address");
    for addr in endpoint.to_socket_addrs()? {
        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(_) => return Ok(()),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// A function of ggml's RPC backend, by name.
fn rpc_fn(name: &CStr) -> Result<*mut c_void, String> {
    // SAFETY: registry lookups with NUL-terminated names; a NULL result is checked.
    let reg = unsafe { ll::ggml_backend_reg_by_name(c"RPC".as_ptr()) };
    if reg.is_null() {
        return Err("this build of llama.cpp has no RPC backend (DSpark builds it with GGML_RPC=ON, in .cargo/config.toml; \
                    a build folder from before that needs `cargo clean -p llama-cpp-sys-2`)"
            .into());
    }
    // SAFETY: as above.
    let f = unsafe { ll::ggml_backend_reg_get_proc_address(reg, name.as_ptr()) };
    if f.is_null() {
        return Err(format!("ggml's RPC backend has no {}", name.to_string_lossy()));
    }
    Ok(f)
}

/// Serves `dev` on `endpoint` ("host:port") with `threads` threads until the process ends.
/// Returns only if the server could not start or stopped accepting (ggml prints why).
pub fn serve(endpoint: &str, threads: usize, dev: ll::ggml_backend_dev_t) -> Result<(), String> {
    let f = rpc_fn(c"ggml_backend_rpc_start_server")?;
    // SAFETY: the registry returns this function under this name; its type is ggml-rpc.h's.
    let start: StartServer = unsafe { std::mem::transmute::<*mut c_void, StartServer>(f) };
    let endpoint = CString::new(endpoint).map_err(|_| "endpoint contains NUL")?;
    let mut devs = [dev];
    // SAFETY: a NUL-terminated endpoint, no cache folder, one valid device; ggml copies what
    // it keeps.
    unsafe { start(endpoint.as_ptr(), std::ptr::null(), threads, devs.len(), devs.as_mut_ptr()) };
    Err(format!("the RPC server on {} stopped", endpoint.to_string_lossy()))
}

/// The devices of the RPC server at `endpoint` ("host:port"), for a model's device list.
///
/// ggml-rpc aborts the process when it cannot connect, so the server is reached once first,
/// to fail with a message instead. A server that dies later still ends the process, since
/// ggml-rpc has no error path there; [`exit_on_abort`] makes that a plain error exit.
pub fn remote_devices(endpoint: &str) -> Result<Vec<ll::ggml_backend_dev_t>, String> {
    exit_on_abort();
    reach(endpoint).map_err(|e| format!("cannot reach the RPC server at {endpoint}: {e} (is `dspark rpc-server` or llama.cpp's rpc-server running there?)"))?;
    let f = rpc_fn(c"ggml_backend_rpc_add_server")?;
    // SAFETY: as in `serve`.
    let add: AddServer = unsafe { std::mem::transmute::<*mut c_void, AddServer>(f) };
    let c = CString::new(endpoint).map_err(|_| "endpoint contains NUL")?;
    // SAFETY: a NUL-terminated endpoint; ggml keeps the registry it returns for the process.
    let reg = unsafe { add(c.as_ptr()) };
    if reg.is_null() {
        return Err(format!("the RPC server at {endpoint} offers no devices"));
    }
    // SAFETY: a valid registry; indices below its device count.
    Ok(unsafe { (0..ll::ggml_backend_reg_dev_count(reg)).map(|i| ll::ggml_backend_reg_dev_get(reg, i)).collect() })
}
