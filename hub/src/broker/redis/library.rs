//! The hub's Redis function library (`hub.lua`): loaded at start and after every
//! reconnection, checked every 30 s, never replaced by an older version (nodes of two versions
//! share one Redis during a rolling deploy). Only what loading needs; calls are elsewhere.

use super::*;

/// The function library, with `__PLACEHOLDERS__` for the configuration.
pub(super) const LIBRARY: &str = include_str!("../hub.lua");

/// This build's library version. A node never replaces a loaded library of a higher version;
/// every version keeps the functions and arguments of the ones before it.
pub const LIBRARY_VERSION: i64 = 7;

/// How often the loaded library is checked again (a node of version 1 replaces any library).
pub(super) const LIBRARY_CHECK_EVERY: Duration = Duration::from_secs(30);

/// A library found loaded in Redis.
pub(super) struct LoadedLibrary {
    pub(super) version: i64,
    /// History length, TTL (ms), largest envelope, namespaces hash (zeros where the version
    /// cannot tell: 1 tells nothing, before 6 no namespaces).
    pub(super) settings: [i64; 4],
}

impl RedisBroker {
    pub(super) async fn load_library(&self, replace: bool) -> Result<(), BrokerError> {
        if self.cluster {
            within(
                "FUNCTION LOAD",
                self.client
                    .function_load_cluster::<(), _>(replace, self.library.clone()),
            )
            .await
        } else {
            within(
                "FUNCTION LOAD",
                self.client
                    .function_load::<Value, _>(replace, self.library.clone()),
            )
            .await
            .map(|_| ())
        }
    }

    /// The loaded library: `None` if there is none; version 1 had no `hub_version`.
    pub(super) async fn loaded_library(&self) -> Result<Option<LoadedLibrary>, BrokerError> {
        let answer: Result<Vec<i64>, BrokerError> = within(
            "FCALL_RO hub_version",
            self.client
                .fcall_ro("hub_version", Vec::<String>::new(), Vec::<String>::new()),
        )
        .await;
        match answer {
            Ok(v) => match v[..] {
                [version, max_len, ttl_ms, max_bytes, _, ns_hash, ..] => Ok(Some(LoadedLibrary {
                    version,
                    settings: [max_len, ttl_ms, max_bytes, ns_hash],
                })),
                [version, max_len, ttl_ms, max_bytes, ..] => Ok(Some(LoadedLibrary {
                    version,
                    settings: [max_len, ttl_ms, max_bytes, 0],
                })),
                _ => Err(BrokerError::Unexpected(
                    "hub_version answered something unexpected".into(),
                )),
            },
            Err(e) if e.says("function not found") => {
                let list: Value = within(
                    "FUNCTION LIST",
                    self.client.function_list(Some("hub"), false),
                )
                .await?;
                let exists = matches!(&list, Value::Array(a) if !a.is_empty());
                Ok(exists.then_some(LoadedLibrary {
                    version: 1,
                    settings: [0; 4],
                }))
            }
            Err(e) => Err(e),
        }
    }

    /// Makes sure a library of this version or a newer one is loaded: loads it when there is
    /// none, replaces an older one, keeps a newer one, and logs when the loaded one of the same
    /// version has other settings (they apply to every node; this one does not overwrite them).
    pub(super) async fn ensure_library(&self) -> Result<(), BrokerError> {
        let ours = self.settings;
        for _ in 0..3 {
            match self.loaded_library().await? {
                None => match self.load_library(false).await {
                    Ok(()) => {
                        tracing::info!(version = LIBRARY_VERSION, "hub library loaded");
                        return Ok(());
                    }
                    // Another node loaded one meanwhile: look again.
                    Err(e) if e.says("already exists") => continue,
                    Err(e) => return Err(e),
                },
                Some(l) if l.version < LIBRARY_VERSION => {
                    self.load_library(true).await?;
                    tracing::info!(
                        from = l.version,
                        to = LIBRARY_VERSION,
                        "hub library upgraded"
                    );
                    return Ok(());
                }
                Some(l) if l.version > LIBRARY_VERSION => {
                    if !self.newer_noted.swap(true, Ordering::AcqRel) {
                        tracing::info!(
                            loaded = l.version,
                            ours = LIBRARY_VERSION,
                            "a newer hub library is loaded; this node uses it"
                        );
                    }
                    return Ok(());
                }
                Some(l) => {
                    self.namespaces_differ
                        .store(l.settings[3] != ours[3], Ordering::Release);
                    if l.settings[3] != ours[3]
                        && !self.ns_mismatch_noted.swap(true, Ordering::AcqRel)
                    {
                        tracing::error!(
                            loaded = l.settings[3],
                            this_node = ours[3],
                            "the namespaces in Redis (the hub library's) differ from this node's HUB_CONFIG: FCALL hub_publish keeps history by Redis's namespaces for every node; run the same namespaces on every node, then FUNCTION DELETE hub once to load them"
                        );
                    }
                    if l.settings[..3] != ours[..3]
                        && !self.mismatch_noted.swap(true, Ordering::AcqRel)
                    {
                        tracing::warn!(
                            loaded_history_len = l.settings[0],
                            loaded_ttl_ms = l.settings[1],
                            loaded_max_bytes = l.settings[2],
                            this_history_len = ours[0],
                            this_ttl_ms = ours[1],
                            this_max_bytes = ours[2],
                            "the hub library loaded in Redis has other settings than this node                              (HUB_HISTORY_LEN, HUB_HISTORY_TTL_SECS, HUB_MAX_MESSAGE_BYTES): the                              loaded ones apply to every node; to change them, run FUNCTION DELETE                              hub once every node has the new settings"
                        );
                    }
                    return Ok(());
                }
            }
        }
        Err(BrokerError::Unexpected(
            "the hub library kept changing while it was being loaded".into(),
        ))
    }

    /// Reloads the function library whenever the command connection comes back (a restarted
    /// or failed-over Redis may have lost it).
    pub(super) async fn reload_loop(
        self: Arc<Self>,
        mut connected: tokio::sync::broadcast::Receiver<fred::types::config::Server>,
    ) {
        let mut check = tokio::time::interval(LIBRARY_CHECK_EVERY);
        loop {
            tokio::select! {
                r = connected.recv() => match r {
                    Ok(_) | Err(RecvError::Lagged(_)) => {
                        // A new connection: a restarted or failed-over Redis may have lost it.
                        self.library_loaded.store(false, Ordering::Release);
                        while let Err(e) = self.ensure_library().await {
                            tracing::warn!(error = %e, "loading the hub functions failed; retrying");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                        self.library_loaded.store(true, Ordering::Release);
                    }
                    Err(RecvError::Closed) => return,
                },
                _ = check.tick(), if self.library_loaded.load(Ordering::Acquire) => {
                    // A node of version 1 replaces whatever is loaded when it starts.
                    if let Err(e) = self.ensure_library().await {
                        tracing::debug!(error = %e, "checking the hub library failed");
                    }
                }
            }
        }
    }
}
