//! The control plane's high availability, end to end: three real `pimesh-control`
//! replicas, two real proxies (nodes a and b) whose site config comes only from the
//! replicas' discovery stream (their config file does not exist), a backend on node b,
//! and a steady stream of requests from a client through proxy a to the service on b.
//! Every request is counted; none may fail while replicas die, while all are dead (the
//! proxies route by their cached discovery document, even across a proxy restart), and
//! while a replica comes back with a changed config that both proxies pick up.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use pimesh_test_support::backends::Backend;
use pimesh_test_support::control_plane::ControlPlane;
use pimesh_test_support::http::sample;
use pimesh_test_support::proxy::{Proxy, ProxyOptions};
use pimesh_test_support::{free_addr, free_port, wait_until, Site};

/// `GET /` with `Host: host` through the outbound port `outbound`, on a new connection:
/// `Ok` when the backend `expected` answered 200.
async fn call(outbound: SocketAddr, host: &str, expected: &str) -> Result<(), String> {
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(outbound)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(connection);
        let request = Request::get("/")
            .header("host", host)
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        let body = String::from_utf8_lossy(&body).into_owned();
        if status == 200 && body == format!("{expected}\n") {
            Ok(())
        } else {
            Err(format!("{status} {body:?}"))
        }
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .unwrap_or_else(|_| Err("no answer in 10 s".to_owned()))
}

/// A steady stream of requests (4 senders, about 50 per second together) to `web`
/// through the outbound port in `target`; every result is counted.
struct Traffic {
    target: Arc<Mutex<SocketAddr>>,
    running: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Traffic {
    fn start(outbound: SocketAddr) -> Traffic {
        let target = Arc::new(Mutex::new(outbound));
        let running = Arc::new(AtomicBool::new(true));
        let ok = Arc::new(AtomicU64::new(0));
        let failures: Arc<Mutex<Vec<String>>> = Arc::default();
        let tasks = (0..4)
            .map(|_| {
                let (target, running) = (Arc::clone(&target), Arc::clone(&running));
                let (ok, failures) = (Arc::clone(&ok), Arc::clone(&failures));
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(Duration::from_millis(80));
                    loop {
                        tick.tick().await;
                        if !running.load(Ordering::SeqCst) {
                            continue;
                        }
                        let outbound = *target.lock().expect("lock");
                        match call(outbound, "web", "web").await {
                            Ok(()) => ok.fetch_add(1, Ordering::SeqCst),
                            Err(err) => {
                                failures.lock().expect("lock").push(err);
                                0
                            }
                        };
                    }
                })
            })
            .collect();
        Traffic {
            target,
            running,
            ok,
            failures,
            tasks,
        }
    }

    fn ok(&self) -> u64 {
        self.ok.load(Ordering::SeqCst)
    }

    /// Lets at least `count` more requests succeed, then asserts that none failed.
    async fn flow(&self, count: u64, during: &str) {
        let until = self.ok() + count;
        wait_until(&format!("{count} requests {during}"), || async {
            self.ok() >= until || !self.failures.lock().expect("lock").is_empty()
        })
        .await;
        self.assert_no_failures(during);
    }

    fn assert_no_failures(&self, during: &str) {
        let failures = self.failures.lock().expect("lock").clone();
        assert!(
            failures.is_empty(),
            "{} of {} requests failed {during}: {failures:?}",
            failures.len(),
            failures.len() as u64 + self.ok()
        );
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn cluster_toml(site: &Site, a: u16, b: u16, services: &str) -> String {
    format!(
        "site = \"{}\"\n[proxy]\nmax_connections = 1000\n\
         [nodes.a]\naddress = \"127.0.0.1:{a}\"\n\
         [nodes.b]\naddress = \"127.0.0.1:{b}\"\n{services}",
        site.name
    )
}

/// The control source a proxy's `/config` reports.
async fn control_of(proxy: &Proxy) -> serde_json::Value {
    proxy.config().await["control"].clone()
}

#[tokio::test]
async fn the_mesh_keeps_serving_through_replica_failures_and_picks_up_changes_after() {
    let site = Site::new("depot");
    let web = Backend::start("web").await;
    let api = Backend::start("api").await;
    let (a_port, b_port) = (free_port(), free_port());
    let web_on_b = format!("[services.web]\nport = {}\nnodes = [\"b\"]\n", web.port);
    let config = cluster_toml(&site, a_port, b_port, &web_on_b);
    let mut plane = ControlPlane::new(site, &config);

    // Three replicas on addresses kept for the one that comes back.
    let addrs: Vec<SocketAddr> = (0..3).map(|_| free_addr()).collect();
    let root = plane.path().to_path_buf();
    for (i, addr) in addrs.iter().enumerate() {
        let log = root.join(format!("replica-{i}.log"));
        let replica = plane.replica(1).listen(*addr).log(&log).start().await;
        plane.replicas.push(replica);
    }
    let root = root.as_path();

    // The proxies' own config file does not exist: everything comes from discovery.
    let no_file = root.join("no-cluster.toml");
    let a_id = plane.site.identity_dir(root, "a", &[]);
    let b_id = plane.site.identity_dir(root, "b", &[]);
    let b = Proxy::start_with(
        ProxyOptions {
            dir: root,
            name: "b",
            config: &no_file,
            identity: Some(&b_id),
            inbound_port: b_port,
            local_ip: "127.0.0.2",
        },
        &plane.proxy_args("b"),
    )
    .await;
    let a_args = plane.proxy_args("a");
    let start_a = || {
        Proxy::start_with(
            ProxyOptions {
                dir: root,
                name: "a",
                config: &no_file,
                identity: Some(&a_id),
                inbound_port: a_port,
                local_ip: "127.0.0.1",
            },
            &a_args,
        )
    };
    let mut a = start_a().await;
    for proxy in [&a, &b] {
        wait_until(
            "both proxies route by a live discovery document",
            || async { control_of(proxy).await["source"] == "live" },
        )
        .await;
    }
    wait_until("web answers through the mesh", || async {
        call(a.outbound, "web", "web").await.is_ok()
    })
    .await;

    let traffic = Traffic::start(a.outbound);
    traffic.flow(50, "with three replicas").await;

    // kill -9 two of three: the watches on them fail over to the third.
    let third = plane.replicas.pop().expect("three");
    for replica in plane.replicas.drain(..) {
        replica.kill();
    }
    for proxy in [&a, &b] {
        wait_until("the proxies watch the last replica", || async {
            control_of(proxy).await["replica"] == third.addr.to_string()
        })
        .await;
    }
    traffic
        .flow(100, "after two of three replicas were killed")
        .await;

    // kill -9 the last: traffic continues by the last good document.
    third.kill();
    for proxy in [&a, &b] {
        wait_until("the proxies notice no replica answers", || async {
            control_of(proxy).await["connected"] == false
        })
        .await;
    }
    traffic.flow(100, "with every replica dead").await;

    // A proxy restarted now routes by its cached document.
    traffic.running.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await; // requests in flight finish
    traffic.assert_no_failures("before proxy a's restart");
    drop(a);
    a = start_a().await;
    let restarted = control_of(&a).await;
    assert_eq!(restarted["source"], "cache", "{restarted}");
    *traffic.target.lock().expect("lock") = a.outbound;
    traffic.running.store(true, Ordering::SeqCst);
    traffic
        .flow(100, "through a proxy restarted from its cache")
        .await;

    // One replica comes back with a changed config: a new service, api on b.
    let old_version = control_of(&b).await["version"].clone();
    let api_on_b = format!(
        "{web_on_b}[services.api]\nport = {}\nnodes = [\"b\"]\n",
        api.port
    );
    plane.write_config(&cluster_toml(&plane.site, a_port, b_port, &api_on_b));
    let log = root.join("replica-back.log");
    let back = plane.replica(1).listen(addrs[0]).log(&log).start().await;
    for proxy in [&a, &b] {
        wait_until("both proxies take the new document", || async {
            let control = control_of(proxy).await;
            control["source"] == "live"
                && control["replica"] == back.addr.to_string()
                && control["version"] != old_version
        })
        .await;
    }
    wait_until("api answers through the mesh", || async {
        call(a.outbound, "api", "api").await.is_ok()
    })
    .await;
    traffic.flow(50, "after a replica came back").await;

    let metrics = a.metrics().await;
    assert!(
        sample(&metrics, "pimesh_control_failovers_total") >= 1.0,
        "{metrics}"
    );
    assert!(
        sample(&metrics, "pimesh_discovery_updates_total") >= 1.0,
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "pimesh_control_connected"),
        1.0,
        "{metrics}"
    );
    drop(back);
    traffic.assert_no_failures("in the whole run");
}
