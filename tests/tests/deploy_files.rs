//! Everything under `deploy/` is checked by the tool that owns its format: hadolint for the
//! Dockerfile, kubernetes-validate for the manifests, promtool for the alerting rules (with unit
//! tests) and the Prometheus configuration; and every metric that the dashboard and the alerts
//! use exists in a running hub's `/metrics`.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use hub_tests::{nginx::repo_root, Hub};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

fn deploy(path: &str) -> PathBuf {
    repo_root().join("deploy").join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(deploy(path)).unwrap_or_else(|e| panic!("deploy/{path}: {e}"))
}

/// Runs a checker; it must succeed (scripts/test.sh installs each one).
fn check(program: &str, args: &[&str], dir: &PathBuf) {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{program} could not run ({e}); scripts/test.sh installs it"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn dockerfile_passes_hadolint_and_runs_the_binary_alone_as_non_root() {
    check("hadolint", &["Dockerfile"], &deploy(""));
    let df = read("Dockerfile");
    assert_eq!(
        df.matches("\nFROM ").count() + usize::from(df.starts_with("FROM ")),
        2
    );
    assert!(df.contains("HEALTHCHECK"), "a HEALTHCHECK");
    assert!(
        df.contains("\"healthcheck\"]"),
        "the health check asks /healthz through the hub"
    );
    let user = df
        .lines()
        .rfind(|l| l.starts_with("USER "))
        .expect("a USER line");
    assert!(!user.contains("root") && !user.contains(" 0"), "{user}");
}

#[test]
fn kubernetes_manifests_validate_and_outlast_the_drain() {
    let dir = deploy("k8s");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    files.sort();
    for want in [
        "configmap.yaml",
        "deployment.yaml",
        "hpa.yaml",
        "pdb.yaml",
        "redis.yaml",
        "secret.yaml",
        "service.yaml",
    ] {
        assert!(files.iter().any(|f| f == want), "deploy/k8s/{want}");
    }
    let mut args = vec!["--strict", "--quiet"];
    args.extend(files.iter().map(String::as_str));
    check("kubernetes-validate", &args, &dir);

    let number_after = |text: &str, key: &str| -> u64 {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(key))
            .unwrap_or_else(|| panic!("no {key}"));
        line.rsplit(':')
            .next()
            .unwrap()
            .trim()
            .trim_matches('"')
            .parse()
            .unwrap()
    };
    let drain = number_after(&read("k8s/configmap.yaml"), "HUB_DRAIN_SECS:");
    let dep = read("k8s/deployment.yaml");
    let grace = number_after(&dep, "terminationGracePeriodSeconds:");
    let pre_stop = number_after(&dep, "seconds:");
    assert!(
        grace > drain + pre_stop,
        "grace {grace} s must outlast the preStop pause {pre_stop} s + drain {drain} s"
    );
    for probe in ["path: /readyz", "path: /healthz", "preStop:", "resources:"] {
        assert!(dep.contains(probe), "deployment.yaml has {probe}");
    }
}

#[test]
fn compose_runs_the_nginx_conf_in_front_of_two_hubs_on_redis() {
    let compose = read("compose.yaml");
    assert!(compose.contains("./nginx/hub.conf:/etc/nginx/conf.d/default.conf"));
    let conf = read("nginx/hub.conf");
    for node in ["hub1", "hub2"] {
        assert!(compose.contains(&format!("\n  {node}:")), "service {node}");
        assert!(
            conf.contains(&format!("server {node}:8080")),
            "upstream {node}"
        );
    }
    assert!(compose.contains("HUB_REDIS_URL: redis://redis:6379"));
    assert!(compose.contains("dockerfile: deploy/Dockerfile"));
    for directive in [
        "proxy_buffering off;",
        "proxy_http_version 1.1;",
        "proxy_read_timeout 1h;",
        "proxy_next_upstream error timeout http_503;",
        "proxy_set_header Upgrade $http_upgrade;",
    ] {
        assert!(conf.contains(directive), "hub.conf: {directive}");
    }
}

#[test]
fn prometheus_rules_check_and_their_unit_tests_pass() {
    let dir = deploy("prometheus");
    check("promtool", &["check", "rules", "alerts.yaml"], &dir);
    check("promtool", &["test", "rules", "alerts_test.yaml"], &dir);
    check("promtool", &["check", "config", "prometheus.yml"], &dir);
}

/// Every `hub_*` name in a text, without the histogram suffixes Prometheus adds.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("hub_") {
        let start = i + at;
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = text[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(text.len(), |e| start + e);
        if boundary {
            names.insert(text[start..end].to_string());
        }
        i = end;
    }
    names
}

#[tokio::test]
async fn every_metric_of_the_dashboard_and_alerts_exists() {
    let dashboard = read("grafana/hub-dashboard.json");
    let json: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard is JSON");
    let exprs: Vec<String> = json["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| t["expr"].as_str().unwrap().to_string())
        .collect();
    assert!(exprs.len() >= 10, "{} queries", exprs.len());
    let mut used = metric_names(&exprs.join("\n"));
    let alerts = read("prometheus/alerts.yaml");
    let alert_exprs: String = alerts
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("expr:"))
        .collect::<Vec<_>>()
        .join("\n");
    used.extend(metric_names(&alert_exprs));
    // The job label names the scrape job, not a metric.
    used.retain(|n| n != "hub_nodes");

    let hub = Hub::start(&[]).await;
    let text = hub.metrics().await;
    let exposed: BTreeSet<String> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next().map(str::to_string))
        .collect();
    let missing: Vec<&String> = used.iter().filter(|n| !exposed.contains(*n)).collect();
    assert!(missing.is_empty(), "not in /metrics: {missing:?}");
    for want in [
        "hub_connections",
        "hub_connections_max",
        "hub_connections_closed_total",
        "hub_connections_rejected_total",
        "hub_messages_delivered_total",
        "hub_messages_dropped_total",
        "hub_delivery_latency_seconds_bucket",
        "hub_redis_up",
        "hub_redis_reconnects_total",
        "hub_ready",
    ] {
        assert!(used.contains(want), "the dashboard or alerts show {want}");
    }
}

#[test]
fn metric_names_are_found_whole() {
    let names = metric_names("sum(rate(hub_a_total{x=\"y\"}[5m])) / xhub_b + hub_c");
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        vec!["hub_a_total".to_string(), "hub_c".to_string()]
    );
}

/// The runtime image (distroless `cc`) carries glibc, libm and libgcc_s and nothing else: the
/// binary must need no other shared library (no OpenSSL, say).
#[test]
fn the_binary_needs_only_what_the_runtime_image_has() {
    let out = Command::new("ldd")
        .arg(hub_tests::binary("hub"))
        .output()
        .expect("ldd");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let allowed = [
        "linux-vdso",
        "libgcc_s.so",
        "libm.so",
        "libc.so",
        "ld-linux",
    ];
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        assert!(
            allowed.iter().any(|a| line.contains(a)),
            "the image would lack: {line}"
        );
    }
    let df = read("Dockerfile");
    assert!(
        df.contains("gcr.io/distroless/cc-debian12"),
        "runtime base as checked above"
    );
}
