//! How the hub reaches Redis: the URL forms of `HUB_REDIS_URL` turned into fred's configuration,
//! and TLS with verified certificates (the system's roots, or `HUB_REDIS_CA_FILE`).
//!
//! A TLS URL only ever connects over TLS: a plaintext server, or a certificate that does not
//! verify, fails the handshake and the node stays not ready (saying why in its log). Nothing
//! here connects; `broker::redis` does.

use fred::prelude::Config as FredConfig;
use fred::types::config::TlsConnector;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

/// Schemes `HUB_REDIS_URL` may use.
pub const SCHEMES: [&str; 6] = [
    "redis://",
    "rediss://",
    "redis-cluster://",
    "rediss-cluster://",
    "redis-sentinel://",
    "rediss-sentinel://",
];

/// Rewrites a Sentinel URL with several sentinels, `redis-sentinel://[user:pass@]h1:p1,h2:p2/db?
/// sentinelServiceName=name`, into fred's form (the first sentinel as the host, the others as
/// `node=` parameters). Other URLs are returned as they are.
pub fn fred_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    if !scheme.ends_with("-sentinel") {
        return url.to_string();
    }
    let (authority, tail) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((u, h)) => (format!("{u}@"), h),
        None => (String::new(), authority),
    };
    let mut hosts = hosts.split(',').filter(|h| !h.is_empty());
    let Some(first) = hosts.next() else {
        return url.to_string();
    };
    let nodes: Vec<String> = hosts.map(|h| format!("node={h}")).collect();
    let mut out = format!("{scheme}://{userinfo}{first}{tail}");
    if !nodes.is_empty() {
        out.push(if tail.contains('?') { '&' } else { '?' });
        out.push_str(&nodes.join("&"));
    }
    out
}

/// fred's configuration for `HUB_REDIS_URL`, with a TLS connector whose roots are the PEM
/// certificates in `ca_file` (or the system's). Errors name the variable.
pub fn config(url: &str, ca_file: Option<&str>) -> Result<FredConfig, String> {
    let mut config = FredConfig::from_url(&fred_url(url)).map_err(|e| {
        // The URL may hold a password: say what is wrong, not the URL.
        format!("HUB_REDIS_URL: {}", e.details())
    })?;
    if let Some(tls) = config.tls.as_mut() {
        tls.connector = connector(ca_file)?;
    } else if ca_file.is_some() {
        return Err(
            "HUB_REDIS_CA_FILE is set but HUB_REDIS_URL is not a TLS URL (rediss://...)".into(),
        );
    }
    // Follow the reconnect policy from the first attempt on, instead of failing start-up.
    config.fail_fast = false;
    Ok(config)
}

fn connector(ca_file: Option<&str>) -> Result<TlsConnector, String> {
    let Some(path) = ca_file else {
        return TlsConnector::default_rustls()
            .map_err(|e| format!("HUB_REDIS_URL: the system's CA certificates: {e}"));
    };
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("HUB_REDIS_CA_FILE {path:?}: cannot read: {e}"))?;
    for cert in certs {
        let cert = cert.map_err(|e| format!("HUB_REDIS_CA_FILE {path:?}: not PEM: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("HUB_REDIS_CA_FILE {path:?}: {e}"))?;
    }
    if roots.is_empty() {
        return Err(format!("HUB_REDIS_CA_FILE {path:?}: no certificate in it"));
    }
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("HUB_REDIS_CA_FILE: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tls.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_sentinels_become_fred_nodes() {
        assert_eq!(
            fred_url("redis-sentinel://u:p@s1:26379,s2:26380,s3:26381/0?sentinelServiceName=main"),
            "redis-sentinel://u:p@s1:26379/0?sentinelServiceName=main&node=s2:26380&node=s3:26381"
        );
        assert_eq!(
            fred_url("redis-sentinel://s1:26379,s2:26380"),
            "redis-sentinel://s1:26379?node=s2:26380"
        );
        for same in [
            "redis://:secret@host:6379/0",
            "redis-sentinel://s1:26379/0?sentinelServiceName=main",
        ] {
            assert_eq!(fred_url(same), same);
        }
    }

    #[test]
    fn urls_and_ca_files_are_checked_without_showing_passwords() {
        let e = config("redis://:hunter2@host:notaport", None).unwrap_err();
        assert!(
            e.starts_with("HUB_REDIS_URL") && !e.contains("hunter2"),
            "{e}"
        );
        let e = config("redis://host:6379", Some("/nonexistent.pem")).unwrap_err();
        assert!(e.contains("HUB_REDIS_CA_FILE"), "{e}");
        let e = config("rediss://host:6379", Some("/nonexistent.pem")).unwrap_err();
        assert!(
            e.contains("HUB_REDIS_CA_FILE") && e.contains("cannot read"),
            "{e}"
        );
        assert!(config("rediss://user:pw@host:6379/2", None).is_ok());
        let c = config("redis-sentinel://s1:1,s2:2/0?sentinelServiceName=m", None).unwrap();
        assert!(!c.fail_fast);
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(5_000))]

            /// Any HUB_REDIS_URL is a configuration or an error that does not show the
            /// password; never a panic.
            #[test]
            fn any_url_is_a_config_or_an_error_without_the_password(
                scheme in "(redis|rediss|redis-cluster|redis-sentinel|rediss-sentinel|x)",
                user in "[a-z]{0,6}",
                rest in "[a-z0-9.:,/?=&@-]{0,40}",
            ) {
                let url = format!("{scheme}://{user}:Pw0rdSecret@{rest}");
                if let Err(e) = config(&url, None) {
                    prop_assert!(!e.contains("Pw0rdSecret"), "{}", e);
                }
                let _ = fred_url(&url);
            }

            /// Several sentinels keep every host, in order, and the credentials and path.
            #[test]
            fn sentinel_lists_keep_every_host(
                hosts in proptest::collection::vec("[a-z]{1,8}:[0-9]{1,5}", 1..5),
                auth in proptest::option::of("[a-z]{1,6}:[a-z0-9]{1,8}"),
            ) {
                let userinfo = auth.map(|a| format!("{a}@")).unwrap_or_default();
                let url = format!("redis-sentinel://{userinfo}{}/0?sentinelServiceName=m", hosts.join(","));
                let out = fred_url(&url);
                let mut want = format!("redis-sentinel://{userinfo}{}/0?sentinelServiceName=m", hosts[0]);
                for h in &hosts[1..] {
                    want.push_str(&format!("&node={h}"));
                }
                prop_assert_eq!(out, want);
            }
        }
    }
}
