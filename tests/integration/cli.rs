//! The `oboe` command line: `check` on the shipped route files and on broken
//! ones, and `--version`.

use std::path::Path;
use std::process::Output;

use crate::harness::{bind_loopback, oboe_command};

fn check(path: &Path, env: &[(&str, &str)]) -> Output {
    oboe_command()
        .args(["check", "--config"])
        .arg(path)
        .envs(env.iter().copied())
        .output()
        .expect("run oboe check")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn check_passes_on_every_route_file_in_config() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("read config/") {
        let path = entry.expect("directory entry").path();
        let is_route_file = path.extension().is_some_and(|e| e == "yaml" || e == "yml");
        if !is_route_file {
            continue;
        }
        let out = check(&path, &[]);
        assert!(
            out.status.success(),
            "{} fails `oboe check`:\n{}",
            path.display(),
            text(&out.stderr)
        );
        assert!(text(&out.stdout).contains(": OK"), "{}", text(&out.stdout));
        checked += 1;
    }
    assert!(checked > 0, "no route files found in {}", dir.display());
}

#[test]
fn check_names_every_bad_key_path_of_a_broken_file_and_exits_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("broken.yaml");
    std::fs::write(
        &path,
        r#"lissten: 127.0.0.1:7070
listen: nowhere
shutdown_grace: 5 parsecs
limits: { max_requests: 0 }
upstream: { idle_timeout: soon }
routes:
  - name: api
    path_prefix: /api/
    upstream: http://127.0.0.1:8080/
    caller: { required: false }
    token: { grant: none }
  - name: api
    path_prefix: /api/
    upstream: http://127.0.0.1:8081/
    caller: { required: false }
    token: { grant: none }
  - name: bad
    nmae: typo
    path_prefix: no-slash
    upstream: ftp://example.com/
    caller: { required: false }
    token: { grant: teleport }
    timeout: forever
    headers: { set: { host: evil.example }, remove: ["not a header"] }
"#,
    )
    .expect("write route file");

    let out = check(&path, &[]);

    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    for key_path in [
        "lissten: unknown key",
        "listen:",
        "shutdown_grace:",
        "limits.max_requests:",
        "upstream.idle_timeout:",
        "routes[1].name: \"api\" is used by an earlier route",
        "routes[1].path_prefix: \"/api/\" is used by an earlier route",
        "routes[2].nmae: unknown key",
        "routes[2].path_prefix:",
        "routes[2].upstream:",
        "routes[2].token.grant:",
        "routes[2].timeout:",
        "routes[2].headers.set.host:",
        "routes[2].headers.remove[0]:",
    ] {
        assert!(
            stderr
                .lines()
                .any(|l| l.trim_start_matches("  - ").starts_with(key_path)),
            "`{key_path}` is not named:\n{stderr}"
        );
    }
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
}

#[test]
fn check_reports_a_type_error_together_with_the_other_problems() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("broken.yaml");
    std::fs::write(
        &path,
        "lissten: x\nlimits: { max_requests: lots }\nshutdown_grace: 5 parsecs\n",
    )
    .expect("write route file");

    let out = check(&path, &[]);

    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    for key_path in ["lissten", "limits.max_requests", "shutdown_grace"] {
        assert!(
            stderr.contains(key_path),
            "`{key_path}` is not named:\n{stderr}"
        );
    }
}

#[test]
fn check_names_a_duplicate_route_by_its_index_in_the_file_after_an_invalid_route() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("broken.yaml");
    let route = |name: &str, prefix: &str, grant: &str| {
        format!(
            "  - name: {name}\n    path_prefix: {prefix}\n    upstream: http://127.0.0.1:8080/\n    caller: {{ required: false }}\n    token: {{ grant: {grant} }}\n"
        )
    };
    std::fs::write(
        &path,
        format!(
            "routes:\n{}{}{}",
            route("api", "/api/", "none"),
            route("bad", "/bad/", "teleport"),
            route("api", "/api/", "none"),
        ),
    )
    .expect("write route file");

    let out = check(&path, &[]);

    let stderr = text(&out.stderr);
    assert!(stderr.contains("routes[1].token.grant:"), "{stderr}");
    assert!(stderr.contains("routes[2].name:"), "{stderr}");
    assert!(stderr.contains("routes[2].path_prefix:"), "{stderr}");
}

#[test]
fn check_applies_and_validates_oboe_env_overrides() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/sidecar.yaml");

    let overridden = check(&file, &[("OBOE_LIMITS__MAX_REQUESTS", "7")]);
    let broken = check(&file, &[("OBOE_SHUTDOWN_GRACE", "forever")]);

    assert!(overridden.status.success(), "{}", text(&overridden.stderr));
    assert!(
        text(&overridden.stdout).contains("max_requests: 7"),
        "{}",
        text(&overridden.stdout)
    );
    assert_eq!(broken.status.code(), Some(1));
    assert!(text(&broken.stderr).contains("shutdown_grace:"));
}

#[tokio::test]
async fn check_binds_nothing() {
    // Both addresses are taken by this test; `check` must still pass.
    let (proxy, admin) = (bind_loopback().await, bind_loopback().await);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("oboe.yaml");
    std::fs::write(
        &path,
        format!(
            "listen: {}\nadmin: {{ listen: {} }}\nroutes: []\n",
            proxy.local_addr().expect("address"),
            admin.local_addr().expect("address")
        ),
    )
    .expect("write route file");

    let out = check(&path, &[]);

    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn check_on_a_missing_file_says_so_and_exits_1() {
    let out = check(Path::new("/nonexistent/oboe.yaml"), &[]);

    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("/nonexistent/oboe.yaml"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn version_prints_the_package_version() {
    let out = oboe_command().arg("--version").output().expect("run oboe");

    assert!(out.status.success());
    assert_eq!(
        text(&out.stdout).trim(),
        format!("oboe {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn the_committed_schema_matches_oboe_schema() {
    let out = oboe_command()
        .arg("schema")
        .output()
        .expect("run oboe schema");
    assert!(out.status.success());
    let committed = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/oboe.schema.json");
    let committed = std::fs::read_to_string(committed).expect("config/oboe.schema.json");
    let parse = |text: &str| serde_json::from_str::<serde_json::Value>(text).expect("JSON");
    assert!(
        parse(&committed) == parse(&text(&out.stdout)),
        "config/oboe.schema.json is stale: run `cargo run -- schema > config/oboe.schema.json`"
    );
}

#[tokio::test]
async fn dev_runs_the_whole_flow_with_the_token_it_prints() {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::from(oboe_command())
        .args(["dev", "--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn oboe dev");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let (mut proxy, mut token) = (None, None);
    crate::harness::within("the dev banner", async {
        while let Ok(Some(line)) = lines.next_line().await {
            let line = line.trim();
            if let Some(url) = line.strip_prefix("proxy") {
                proxy = Some(url.trim().to_owned());
            }
            if let Some(t) = line.strip_prefix("export TOKEN=") {
                token = Some(t.to_owned());
                break;
            }
        }
    })
    .await;
    let (proxy, token) = (proxy.expect("proxy URL"), token.expect("token"));
    let client = crate::harness::Client::http1();
    let authed = |path: &str| {
        http::Request::get(format!("{proxy}{path}"))
            .header("authorization", format!("Bearer {token}"))
            .body(crate::harness::empty())
            .expect("request")
    };
    crate::harness::eventually("the dev proxy to be ready", || async {
        client
            .try_send(authed("/api/x"))
            .await
            .is_ok_and(|r| r.status == 200)
    })
    .await;
    let graph = client.send(authed("/graph/me")).await;
    assert_eq!(graph.status, 200, "{}", graph.text());
    let seen = graph.json()["headers"]["authorization"][0]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        seen.starts_with("Bearer ") && !seen.contains(&token),
        "exchanged: {seen}"
    );
    assert_eq!(client.get(&format!("{proxy}/echo/hi")).await.status, 200);
    assert_eq!(client.get(&format!("{proxy}/jobs/run")).await.status, 200);
    client
        .get(&format!("{proxy}/api/x"))
        .await
        .assert_problem(401, "invalid_token");
    let _ = child.kill().await;
}

#[test]
fn otlp_export_needs_the_otlp_build() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("oboe.yaml");
    std::fs::write(
        &path,
        "telemetry:\n  otlp: { endpoint: 'http://otel-collector:4317', sample_ratio: 2 }\nroutes: []\n",
    )
    .expect("write route file");
    let out = check(&path, &[]);
    let stderr = text(&out.stderr);
    assert!(stderr.contains("telemetry.otlp.sample_ratio"), "{stderr}");
    if cfg!(feature = "otlp") {
        assert!(!stderr.contains("--features otlp"), "{stderr}");
    } else {
        assert_eq!(out.status.code(), Some(1));
        assert!(stderr.contains("--features otlp"), "{stderr}");
    }
}
