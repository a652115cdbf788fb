//! Hot reload: the real watcher over a real route file on disk.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::BodyExt;

use crate::harness::*;

struct Watched {
    proxy: SocketAddr,
    admin: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), oboe::RunError>>,
}

impl Watched {
    async fn start(path: PathBuf, routes: &str) -> Self {
        let proxy_listener = bind_loopback().await;
        let admin_listener = bind_loopback().await;
        let proxy = proxy_listener.local_addr().expect("addr");
        let admin = admin_listener.local_addr().expect("addr");
        std::fs::write(&path, file(proxy, admin, routes)).expect("write route file");
        let config = oboe::config::load(&path).expect("valid route file");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(oboe::run_watching(
            config,
            path,
            oboe::Listeners {
                proxy: proxy_listener,
                admin: admin_listener,
            },
            async move {
                let _ = rx.await;
            },
        ));
        wait_ready(admin).await;
        Self {
            proxy,
            admin,
            stop: Some(tx),
            task,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy)
    }

    async fn reloads(&self, outcome: &str) -> f64 {
        let text = Client::http1()
            .get(&format!("http://{}/metrics", self.admin))
            .await
            .text();
        metric(
            &text,
            &format!("oboe_config_reloads_total{{outcome=\"{outcome}\"}}"),
        )
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        within("oboe to stop", &mut self.task)
            .await
            .expect("task")
            .expect("clean exit");
    }
}

fn file(proxy: SocketAddr, admin: SocketAddr, routes: &str) -> String {
    format!("listen: {proxy}\nadmin: {{ listen: {admin} }}\nroutes:\n{routes}")
}

async fn path_seen(w: &Watched, path: &str) -> Option<String> {
    let reply = Client::http1().get(&w.url(path)).await;
    let json: serde_json::Value = serde_json::from_slice(&reply.body).ok()?;
    json["path"].as_str().map(str::to_owned)
}

#[tokio::test]
async fn a_new_route_file_applies_while_a_long_request_finishes_on_the_old_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("oboe.yaml");
    let (drip, chunks) = Upstream::drip().await;
    let echo = Upstream::echo().await;
    let w = Watched::start(path.clone(), &open_route("a", "/a/", &drip.url("/"), "")).await;

    // A long response streams through the old route.
    let response = Client::http1().stream(get_request(&w.url("/a/long"))).await;
    assert_eq!(response.status(), 200);
    chunks
        .send(Bytes::from_static(b"first "))
        .await
        .expect("send");

    // The file changes: /a/ now goes to the echo upstream, /b/ is new.
    let routes = format!(
        "{}{}",
        open_route("a", "/a/", &echo.url("/new/"), ""),
        open_route("b", "/b/", &echo.url("/b/"), "")
    );
    std::fs::write(&path, file(w.proxy, w.admin, &routes)).expect("rewrite");
    eventually("the new routes", || async {
        path_seen(&w, "/a/x").await.as_deref() == Some("/new/x")
    })
    .await;
    assert_eq!(path_seen(&w, "/b/y").await.as_deref(), Some("/b/y"));

    // The old request completes, whole.
    chunks
        .send(Bytes::from_static(b"last"))
        .await
        .expect("send");
    drop(chunks);
    let body = within("the old response", response.into_body().collect())
        .await
        .expect("complete body")
        .to_bytes();
    assert_eq!(&body[..], b"first last");
    assert_eq!(w.reloads("ok").await, 1.0);
    w.stop().await;
}

#[tokio::test]
async fn an_invalid_file_is_refused_and_the_old_routes_keep_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("oboe.yaml");
    let echo = Upstream::echo().await;
    let w = Watched::start(
        path.clone(),
        &open_route("a", "/a/", &echo.url("/old/"), ""),
    )
    .await;

    std::fs::write(
        &path,
        file(
            w.proxy,
            w.admin,
            "  - name: a\n    path_prefix: nope\n    upstream: ftp://x/\n",
        ),
    )
    .expect("rewrite");
    eventually("the refusal", || async {
        w.reloads("invalid").await >= 1.0
    })
    .await;
    assert_eq!(path_seen(&w, "/a/x").await.as_deref(), Some("/old/x"));

    // A file that changes the listener: applied, the address needs a restart.
    let moved = file(
        free_port().await,
        w.admin,
        &open_route("a", "/a/", &echo.url("/moved/"), ""),
    );
    std::fs::write(&path, moved).expect("rewrite");
    eventually("the moved route", || async {
        path_seen(&w, "/a/x").await.as_deref() == Some("/moved/x")
    })
    .await;
    w.stop().await;
}

/// Kubernetes updates a ConfigMap volume by writing a new timestamped
/// directory and atomically renaming the `..data` symlink to point at it.
fn configmap_swap(dir: &Path, generation: u32, content: &str) {
    let version = dir.join(format!("..2026_11_24_{generation}"));
    std::fs::create_dir(&version).expect("version dir");
    std::fs::write(version.join("oboe.yaml"), content).expect("write");
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(version.file_name().expect("name"), &tmp).expect("symlink");
    std::fs::rename(&tmp, dir.join("..data")).expect("atomic swap");
}

#[tokio::test]
async fn a_configmap_style_symlink_swap_is_noticed() {
    let echo = Upstream::echo().await;
    let dir2 = tempfile::tempdir().expect("tempdir");
    configmap_swap(dir2.path(), 1, "routes: []\n");
    let top = dir2.path().join("oboe.yaml");
    std::os::unix::fs::symlink("..data/oboe.yaml", &top).expect("symlink");
    let proxy_listener = bind_loopback().await;
    let admin_listener = bind_loopback().await;
    let (proxy, admin) = (
        proxy_listener.local_addr().expect("addr"),
        admin_listener.local_addr().expect("addr"),
    );
    configmap_swap(
        dir2.path(),
        2,
        &file(
            proxy,
            admin,
            &open_route("a", "/a/", &echo.url("/one/"), ""),
        ),
    );
    let config = oboe::config::load(&top).expect("config");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(oboe::run_watching(
        config,
        top.clone(),
        oboe::Listeners {
            proxy: proxy_listener,
            admin: admin_listener,
        },
        async move {
            let _ = rx.await;
        },
    ));
    wait_ready(admin).await;
    let w = Watched {
        proxy,
        admin,
        stop: Some(tx),
        task,
    };
    assert_eq!(path_seen(&w, "/a/x").await.as_deref(), Some("/one/x"));
    configmap_swap(
        dir2.path(),
        3,
        &file(
            proxy,
            admin,
            &open_route("a", "/a/", &echo.url("/two/"), ""),
        ),
    );
    eventually("the swapped file", || async {
        path_seen(&w, "/a/x").await.as_deref() == Some("/two/x")
    })
    .await;
    w.stop().await;
}
