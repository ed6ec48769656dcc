//! `lockstep serve` over TLS: clients need https:// and the CA; a plaintext or untrusting
//! client gets nothing; local workers still reach the coordinator and the job runs; a
//! non-loopback address without TLS is refused.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use lockstep_api::testing::TestJob;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

use crate::common::{free_port, lockstep};

/// A CA and a certificate it signed for `localhost` and 127.0.0.1, as PEM files in `dir`:
/// (ca.pem and its ca-key.pem, cert.pem, key.pem).
fn certificates(dir: &Path) {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    std::fs::write(dir.join("ca-key.pem"), ca_key.serialize_pem()).unwrap();
    let ca = CertifiedIssuer::self_signed(ca, ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn cli(dir: &Path, args: &[&str]) -> (i32, String) {
    let out = lockstep(dir)
        .args(args)
        .env_remove("LOCKSTEP_TLS_CA")
        .env_remove("LOCKSTEP_COORDINATOR")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn a_tls_coordinator_serves_only_clients_that_trust_it_and_its_workers_still_run() {
    let _gang = crate::common::one_gang();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    certificates(d);
    let port = free_port();
    let data = d.join("data");
    let _server = Killed(
        lockstep(d)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args([
                "--tls-cert",
                "cert.pem",
                "--tls-key",
                "key.pem",
                "--data-dir",
            ])
            .arg(&data)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "serve did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    let https = format!("https://localhost:{port}");
    let data_arg = data.to_str().unwrap();
    let client = |extra: &[&str]| {
        let mut args = vec!["status", "--data-dir", data_arg];
        args.extend_from_slice(extra);
        cli(d, &args)
    };

    // Trusting the CA: answered.
    let (code, out) = client(&["--coordinator", &https, "--tls-ca", "ca.pem"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("JOB"), "{out}");
    // Not trusting it (system roots only), or speaking plaintext: refused.
    let (code, out) = client(&["--coordinator", &https]);
    assert_eq!(code, 1, "{out}");
    let (code, out) = client(&["--coordinator", &format!("http://127.0.0.1:{port}")]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("needs an https://"), "{out}");
    // A key given as the CA: named at once, not "UnknownIssuer" later.
    let (code, out) = client(&["--coordinator", &https, "--tls-ca", "key.pem"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("no PEM certificate"), "{out}");
    // Plain http to another machine is refused before anything is sent.
    let (code, out) = client(&["--coordinator", "http://192.0.2.1:7070"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("in clear"), "{out}");

    // A job submitted over TLS runs: its workers reach the coordinator on loopback.
    TestJob::tiny("tls")
        .steps(3)
        .checkpoint_url(&format!("file://{}/ckpt", d.display()))
        .write_to(d);
    let (code, out) = cli(
        d,
        &[
            "submit",
            "job.toml",
            "--watch",
            "--json",
            "--coordinator",
            &https,
            "--tls-ca",
            "ca.pem",
            "--data-dir",
            data_arg,
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("\"state\":\"succeeded\""), "{out}");
}

#[test]
fn bad_tls_files_and_plaintext_beyond_loopback_are_refused_by_name() {
    let _gang = crate::common::one_gang();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    certificates(d);
    std::fs::write(d.join("empty.pem"), "").unwrap();
    let serve = |args: &[&str]| {
        let mut all = vec!["serve", "--data-dir", "data"];
        all.extend_from_slice(args);
        cli(d, &all)
    };
    let (code, out) = serve(&["--listen", "0.0.0.0:0"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("not a loopback address") && out.contains("--tls-cert"),
        "{out}"
    );
    let (code, out) = serve(&[
        "--listen",
        "127.0.0.1:0",
        "--tls-cert",
        "cert.pem",
        "--tls-key",
        "empty.pem",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("--tls-key empty.pem"), "{out}");
    let (code, out) = serve(&[
        "--listen",
        "127.0.0.1:0",
        "--tls-cert",
        "missing.pem",
        "--tls-key",
        "key.pem",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("missing.pem"), "{out}");
    // The CA's own certificate as the server's: every client would fail the handshake
    // (CaUsedAsEndEntity); the mistake is named at start.
    let (code, out) = serve(&[
        "--listen",
        "127.0.0.1:0",
        "--tls-cert",
        "ca.pem",
        "--tls-key",
        "ca-key.pem",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("--tls-cert ca.pem")
            && out.contains("CA certificate")
            && out.contains("--tls-ca"),
        "{out}"
    );
}
