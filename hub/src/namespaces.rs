//! Namespaces: options per channel prefix, read from the `[[namespace]]` tables of the
//! `HUB_CONFIG` file (the longest matching prefix wins; `""` is the default namespace).
//!
//! Reading and checking the file and answering "which namespace is this channel in"; it does
//! not apply the options (auth, the registry, the brokers do).

use serde::{Deserialize, Serialize};

/// The prefix of channels anyone may read by default.
pub const PUBLIC_PREFIX: &str = "public:";

/// One namespace, as the file writes it and `GET /v1/namespaces` answers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Namespace {
    pub prefix: String,
    /// Durable messages kept per channel (0: none); `None`: `HUB_HISTORY_LEN`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history_len: Option<u64>,
    /// `None`: `HUB_HISTORY_TTL_SECS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history_ttl_secs: Option<u64>,
    /// Readable without a token.
    #[serde(default)]
    pub anonymous: bool,
    /// `presence=true` is allowed (else 403).
    #[serde(default = "yes")]
    pub presence: bool,
    /// Streams per channel on one node (0: no limit).
    #[serde(default)]
    pub max_readers: u64,
    /// HTTP publishes per second per channel and node (0: no limit).
    #[serde(default)]
    pub publish_rate: u64,
    /// At most one message per channel every N ms to a stream (0: off).
    #[serde(default)]
    pub conflate_ms: u64,
    /// Channel and member events go to `HUB_WEBHOOK_URL`.
    #[serde(default = "yes")]
    pub webhooks: bool,
}

fn yes() -> bool {
    true
}

impl Namespace {
    fn new(prefix: &str, anonymous: bool) -> Namespace {
        Namespace {
            prefix: prefix.to_string(),
            history_len: None,
            history_ttl_secs: None,
            anonymous,
            presence: true,
            max_readers: 0,
            publish_rate: 0,
            conflate_ms: 0,
            webhooks: true,
        }
    }
}

/// The namespaces in force, longest prefix first (so the first match is the longest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespaces {
    list: Vec<Namespace>,
}

impl Default for Namespaces {
    /// Without a file: `public:` (anonymous) and `""`.
    fn default() -> Namespaces {
        Namespaces::from_list(Vec::new())
    }
}

impl Namespaces {
    /// The file's namespaces, with `public:` (anonymous) and `""` added when it names none.
    fn from_list(mut list: Vec<Namespace>) -> Namespaces {
        if !list.iter().any(|n| n.prefix == PUBLIC_PREFIX) {
            list.push(Namespace::new(PUBLIC_PREFIX, true));
        }
        if !list.iter().any(|n| n.prefix.is_empty()) {
            list.push(Namespace::new("", false));
        }
        list.sort_by(|a, b| {
            b.prefix
                .len()
                .cmp(&a.prefix.len())
                .then(a.prefix.cmp(&b.prefix))
        });
        Namespaces { list }
    }

    /// Checks the `[[namespace]]` tables of `file` (already parsed by serde, unknown keys
    /// refused there): a duplicate prefix, or a value out of range, is one line naming the
    /// file, the key and why.
    pub fn from_file_tables(file: &str, list: Vec<Namespace>) -> Result<Namespaces, String> {
        let mut seen = std::collections::HashSet::new();
        for n in &list {
            if !seen.insert(n.prefix.as_str()) {
                return Err(format!(
                    "HUB_CONFIG {file}: namespace prefix {:?} appears twice (prefix must be unique)",
                    n.prefix
                ));
            }
            let channel_char = |c: char| c.is_ascii_alphanumeric() || "_.:@/-".contains(c);
            if n.prefix.len() > 128 || !n.prefix.chars().all(channel_char) {
                return Err(format!(
                    "HUB_CONFIG {file}: namespace prefix {:?}: at most 128 characters, each one a channel name may hold (A-Z a-z 0-9 _ . : @ / -)",
                    n.prefix
                ));
            }
            if n.history_len.is_some_and(|l| l > 1_000_000) {
                return Err(format!(
                    "HUB_CONFIG {file}: namespace {:?}: history_len must be 0 to 1000000",
                    n.prefix
                ));
            }
            if n.history_ttl_secs
                .is_some_and(|t| t == 0 || t > 30 * 86_400)
            {
                return Err(format!(
                    "HUB_CONFIG {file}: namespace {:?}: history_ttl_secs must be 1 to 2592000",
                    n.prefix
                ));
            }
        }
        Ok(Namespaces::from_list(list))
    }

    /// The namespace of a channel: the longest prefix it starts with.
    pub fn of(&self, channel: &str) -> &Namespace {
        // `""` is always there and matches everything.
        self.list
            .iter()
            .find(|n| channel.starts_with(n.prefix.as_str()))
            .unwrap_or(&self.list[self.list.len() - 1])
    }

    /// Whether a channel can be read without a token.
    pub fn is_anonymous(&self, channel: &str) -> bool {
        self.of(channel).anonymous
    }

    /// The namespaces as the Redis function library reads them: a Lua table of
    /// `{prefix, history length, TTL ms, webhooks}`, longest prefix first (the default
    /// namespace `""` last, so it applies to every other channel), with each history setting
    /// filled from `len`/`ttl_secs` where the namespace has none; and a 32-bit hash of it,
    /// which tells nodes whether they run the same namespaces. Prefixes hold only channel-name
    /// characters, so they are quoted safely.
    pub fn lua_table(&self, len: u64, ttl_secs: u64) -> (String, u32) {
        let mut out = String::from("{");
        for n in &self.list {
            let l = n.history_len.unwrap_or(len);
            let t = n.history_ttl_secs.unwrap_or(ttl_secs) * 1000;
            let w = n.webhooks;
            out.push_str(&format!("{{'{}', {l}, {t}, {w}}}, ", n.prefix));
        }
        out.push('}');
        // FNV-1a, folded to 32 bits: exact in Lua's numbers.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in out.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x100_0000_01b3);
        }
        (out, (h ^ (h >> 32)) as u32)
    }

    /// Every namespace, longest prefix first.
    pub fn all(&self) -> &[Namespace] {
        &self.list
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(prefix: &str) -> Namespace {
        Namespace::new(prefix, false)
    }

    #[test]
    fn without_a_file_public_is_anonymous_and_the_rest_is_not() {
        let n = Namespaces::default();
        assert!(n.is_anonymous("public:x"));
        assert!(!n.is_anonymous("room:1"));
        assert!(!n.is_anonymous("publicx"));
        assert_eq!(n.all().len(), 2);
    }

    #[test]
    fn the_longest_prefix_wins() {
        let mut deep = ns("ticker:fx:");
        deep.conflate_ms = 100;
        let n = Namespaces::from_file_tables("f", vec![ns("ticker:"), deep]).unwrap();
        assert_eq!(n.of("ticker:fx:eur").prefix, "ticker:fx:");
        assert_eq!(n.of("ticker:btc").prefix, "ticker:");
        assert_eq!(n.of("room:1").prefix, "");
        assert_eq!(
            n.of("public:a").prefix,
            "public:",
            "kept when the file names none"
        );
    }

    #[test]
    fn a_file_can_close_public_and_open_another() {
        let mut feed = ns("feed:");
        feed.anonymous = true;
        let n = Namespaces::from_file_tables("f", vec![ns("public:"), feed]).unwrap();
        assert!(!n.is_anonymous("public:x"));
        assert!(n.is_anonymous("feed:x"));
    }

    #[test]
    fn the_library_table_resolves_defaults_and_ends_with_the_default_namespace() {
        let mut t = ns("ticker:");
        t.history_len = Some(10);
        t.webhooks = false;
        let mut all = ns("");
        all.history_ttl_secs = Some(60);
        let n = Namespaces::from_file_tables("f", vec![t, all]).unwrap();
        let (lua, hash) = n.lua_table(1000, 3600);
        // Longest first; equal lengths by name.
        assert_eq!(
            lua,
            "{{'public:', 1000, 3600000, true}, {'ticker:', 10, 3600000, false}, {'', 1000, 60000, true}, }"
        );
        assert_ne!(hash, Namespaces::default().lua_table(1000, 3600).1);
        assert_eq!(hash, n.lua_table(1000, 3600).1, "stable");
    }

    #[test]
    fn duplicates_and_bad_values_name_the_file_and_key() {
        let e = Namespaces::from_file_tables("hub.toml", vec![ns("it's:")]).unwrap_err();
        assert!(e.contains("prefix"), "{e}");
        let e = Namespaces::from_file_tables("hub.toml", vec![ns("a:"), ns("a:")]).unwrap_err();
        assert!(
            e.contains("hub.toml") && e.contains("prefix") && e.contains("\"a:\""),
            "{e}"
        );
        let mut bad = ns("b:");
        bad.history_ttl_secs = Some(0);
        let e = Namespaces::from_file_tables("hub.toml", vec![bad]).unwrap_err();
        assert!(e.contains("history_ttl_secs"), "{e}");
    }
}
