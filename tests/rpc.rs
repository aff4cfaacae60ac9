//! DSpark across machines on llama.cpp's RPC backend, on loopback: `dspark rpc-server`s hold a
//! model's layers and their KV compressed, `dspark run --rpc` places the layers on them.

mod common;

use std::io::Read;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::model;

fn dspark() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dspark"))
}

/// A server process, stopped when dropped.
struct Server {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// `dspark rpc-server` on a free port of 127.0.0.1 with this format and 2 threads (as the
    /// local runs it is compared with: attention splits a long KV over threads), listening.
    fn start(format: &str, name: &str) -> Server {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("rpc-{name}.log"));
        let child = dspark()
            .args(["rpc-server", "--port", &port.to_string(), "--format", format, "--threads", "2"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let server = Server { child, port, log };
        server.wait_for_log("use it with", Duration::from_secs(30));
        server
    }

    fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the server's log contains `what`.
    fn wait_for_log(&self, what: &str, limit: Duration) {
        let start = Instant::now();
        while !self.log().contains(what) {
            assert!(start.elapsed() < limit, "no `{what}` in the server's log after {limit:?}:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A GPL-3 passage of ~330 tokens: long enough that pages past the sinks and the f16 window
/// are compressed.
fn prompt() -> String {
    // ~750 tokens, more than one 512-token ubatch: a ubatch attends to its own rows in f16,
    // so only a longer prompt has compressed rows in its attention (and, with k2v3, a
    // greedy text that differs from f16's).
    let text = dspark::cli::text::default_text().expect("default text");
    text.split_whitespace().take(600).collect::<Vec<_>>().join(" ")
}

fn run(args: &[&str]) -> Output {
    dspark().arg("run").arg("-m").arg(model()).args(["--threads", "2"]).args(args).output().unwrap()
}

fn text_of(out: &Output) -> String {
    assert!(out.status.success(), "dspark run failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Two servers holding half the layers each generate the greedy tokens local DSpark generates
/// with the same format (a coarse one, whose text differs from f16's), and each holds
/// compressed KV for its layers.
#[test]
fn two_servers_generate_as_local_dspark() {
    let (a, b) = (Server::start("k2v3", "a"), Server::start("k2v3", "b"));
    let p = prompt();
    let remote = text_of(&run(&["-p", &p, "-n", "32", "--rpc", &format!("{},{}", a.endpoint(), b.endpoint())]));
    let local = text_of(&run(&["-p", &p, "-n", "32", "--backend", "dspark:k2v3"]));
    let stock = text_of(&run(&["-p", &p, "-n", "32", "--backend", "stock:f16"]));
    assert_ne!(local, stock, "k2v3 and f16 agree on this prompt: the comparison below could not tell them apart");
    assert_eq!(remote, local, "two RPC servers with k2v3 vs local dspark:k2v3");
    // The servers report their KV every 2 s and when it changes; the run is over by now,
    // so wait for the release, which follows a report of the KV held.
    for s in [&a, &b] {
        s.wait_for_log("KV empty", Duration::from_secs(10));
        let log = s.log();
        // The last report before the release: the KV of the whole run (earlier ones may
        // come from the first tokens, which are all in the f16 sink page).
        let run_log = &log[..log.find("KV empty").unwrap_or(log.len())];
        let held = run_log.lines().filter(|l| l.contains(" MiB in ")).last().unwrap_or_else(|| panic!("the server never reported its KV:\n{log}"));
        let bits: f64 = held.split('(').nth(1).and_then(|x| x.split_whitespace().next()).and_then(|x| x.parse().ok()).unwrap();
        assert!(bits < 16.0, "the server's KV is not compressed: {held}");
    }
}

/// A server killed during a generation makes the client fail with a message, in bounded time.
#[test]
fn a_server_killed_mid_generation_fails_the_client() {
    let mut s = Server::start("k4v4", "killed");
    let mut client = dspark()
        .arg("run")
        .arg("-m")
        .arg(model())
        .args(["-p", &prompt(), "-n", "100000", "--ctx", "8192", "--rpc", &s.endpoint()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    s.wait_for_log(" MiB in ", Duration::from_secs(60));
    s.child.kill().unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(st) = client.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = client.kill();
            panic!("the client still runs 60 s after its server was killed");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut err = String::new();
    client.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(!status.success(), "the client succeeded without its server:\n{err}");
    assert!(err.contains("RPC server"), "the client's error does not name the RPC server:\n{err}");
}

/// Endpoints that are wrong or unreachable are refused with a message before anything loads.
#[test]
fn bad_endpoints_get_clear_errors() {
    let free = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let cases = [
        (format!("127.0.0.1:{free}"), format!("cannot reach the RPC server at 127.0.0.1:{free}")),
        ("localhost".to_string(), "expected HOST:PORT".to_string()),
        ("127.0.0.1:99999".to_string(), "expected HOST:PORT".to_string()),
    ];
    for (endpoint, want) in cases {
        let out = run(&["-n", "1", "--rpc", &endpoint]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "--rpc {endpoint} succeeded");
        assert!(err.contains(&want), "--rpc {endpoint}: expected `{want}` in:\n{err}");
    }
    // A server cannot take a port that is in use, and says so.
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port().to_string();
    let out = dspark().args(["rpc-server", "--port", &port]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("cannot listen on 127.0.0.1:"), "rpc-server on a busy port:\n{err}");
    // An auto format needs a model.
    let out = dspark().args(["rpc-server", "--port", "0", "--format", "auto4.5"]).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("calibrate"));
}
