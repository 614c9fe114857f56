//! The bridge's configuration: one TOML file, read once at start.
//!
//! Model: [`RawConfig`] is the file as serde reads it (`deny_unknown_fields`,
//! so a misspelt key is an error, not a silent default); [`Config::parse`]
//! turns it into a [`Config`] whose every field has been checked, and each
//! refusal is a [`ConfigError`] that names the key (`export[1]`,
//! `prefix`, ...). Nothing here does I/O but [`Config::load`], which reads
//! the file; the hostname used for the default `name` is passed in.
//!
//! Invariants of a [`Config`]:
//! - `name` is one subject token of `[A-Za-z0-9_-]`, 1..=64 bytes, so that
//!   `shmbus-bridge.<name>` is a valid shmbus name and a valid NATS header
//!   value;
//! - `prefix` is empty or a valid subject followed by `.` (no wildcard), so
//!   `prefix + S` is a valid subject whenever `S` is;
//! - `export`, `import`, `services_export` are valid patterns; no `import`
//!   pattern lies under `$SYS` (the broker refuses such publishes);
//! - `services_import` are exact names (shmbus names hold no wildcard), and
//!   none of them is matched by a `services_export` pattern (the bridge
//!   would call itself);
//! - timeouts, queue and concurrency bounds are non-zero.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use shmbus_proto::subject::{pattern_matches, validate_pattern, validate_subject};

/// Why a configuration was refused. `key` names the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// TOML syntax, a wrong type, an unknown or missing key: toml's message
    /// names the key.
    #[error("{path}: {message}")]
    Toml { path: PathBuf, message: String },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.into(), message: message.into() }
}

/// One URL or a list of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Urls {
    One(String),
    Many(Vec<String>),
}

/// The file, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub nats: Urls,
    pub shmbus: Option<String>,
    pub name: Option<String>,
    #[serde(default)]
    pub prefix: String,
    #[serde(default)]
    pub export: Vec<String>,
    #[serde(default)]
    pub import: Vec<String>,
    #[serde(default)]
    pub services_export: Vec<String>,
    #[serde(default)]
    pub services_import: Vec<String>,
    pub request_timeout_ms: Option<u64>,
    pub queue: Option<usize>,
    pub max_inflight_requests: Option<usize>,
    pub gap_notices: Option<bool>,
    // NATS credentials and TLS, as async-nats supports them.
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    pub creds: Option<PathBuf>,
    pub nkey: Option<String>,
    pub tls_required: Option<bool>,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

/// How the bridge authenticates to NATS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    None,
    UserPassword { user: String, password: String },
    Token(String),
    Creds(PathBuf),
    Nkey(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tls {
    pub required: bool,
    pub ca: Option<PathBuf>,
    /// Client certificate and key, both or neither.
    pub client: Option<(PathBuf, PathBuf)>,
}

/// A checked configuration (see the module's invariants).
#[derive(Debug, Clone)]
pub struct Config {
    pub nats: Vec<String>,
    pub shmbus: Option<String>,
    pub name: String,
    pub prefix: String,
    pub export: Vec<String>,
    pub import: Vec<String>,
    pub services_export: Vec<String>,
    pub services_import: Vec<String>,
    pub request_timeout: Duration,
    pub queue: usize,
    pub max_inflight_requests: usize,
    pub gap_notices: bool,
    pub auth: Auth,
    pub tls: Tls,
}

pub const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 5_000;
pub const MAX_REQUEST_TIMEOUT_MS: u64 = 600_000;
pub const DEFAULT_QUEUE: usize = 8_192;
pub const DEFAULT_MAX_INFLIGHT: usize = 256;
pub const MAX_NAME_LEN: usize = 64;

impl Config {
    /// Reads and checks `path`; `hostname` gives the default `name`.
    pub fn load(path: &Path, hostname: &str) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Config::parse_str(&text, hostname).map_err(|e| match e {
            ConfigError::Toml { message, .. } => ConfigError::Toml { path: path.to_owned(), message },
            other => other,
        })
    }

    pub fn parse_str(text: &str, hostname: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Toml {
            path: PathBuf::new(),
            message: e.to_string().trim().to_owned(),
        })?;
        Config::parse(raw, hostname)
    }

    pub fn parse(raw: RawConfig, hostname: &str) -> Result<Config, ConfigError> {
        let nats = match raw.nats {
            Urls::One(u) => vec![u],
            Urls::Many(v) => v,
        };
        if nats.is_empty() {
            return Err(invalid("nats", "needs at least one URL"));
        }
        for (i, u) in nats.iter().enumerate() {
            let key = if nats.len() == 1 { "nats".to_owned() } else { format!("nats[{i}]") };
            if u.trim().is_empty() || u.chars().any(char::is_whitespace) {
                return Err(invalid(key, format!("{u:?} is not a URL")));
            }
        }
        if let Some(a) = &raw.shmbus {
            shmbus::Address::parse(a).map_err(|e| invalid("shmbus", format!("{a:?}: {e}")))?;
        }
        let name = match raw.name {
            Some(n) => {
                check_name(&n).map_err(|m| invalid("name", m))?;
                n
            }
            None => default_name(hostname),
        };
        let prefix = raw.prefix;
        if !prefix.is_empty() {
            let Some(body) = prefix.strip_suffix('.') else {
                return Err(invalid("prefix", format!("{prefix:?} must end with '.' (e.g. \"host1.\")")));
            };
            validate_subject(body).map_err(|e| invalid("prefix", format!("{prefix:?}: {e}")))?;
            if body.split('.').next() == Some("$SYS") {
                return Err(invalid("prefix", "may not start with $SYS"));
            }
        }
        let patterns = |key: &str, list: &[String]| -> Result<(), ConfigError> {
            for (i, p) in list.iter().enumerate() {
                validate_pattern(p).map_err(|e| invalid(format!("{key}[{i}]"), format!("{p:?}: {e}")))?;
            }
            Ok(())
        };
        patterns("export", &raw.export)?;
        patterns("import", &raw.import)?;
        patterns("services_export", &raw.services_export)?;
        for (i, p) in raw.import.iter().enumerate() {
            if p.split('.').next() == Some("$SYS") {
                return Err(invalid(format!("import[{i}]"), "$SYS subjects belong to the broker"));
            }
        }
        for (i, n) in raw.services_import.iter().enumerate() {
            let key = format!("services_import[{i}]");
            if validate_pattern(n).is_ok() && validate_subject(n).is_err() {
                return Err(invalid(
                    key,
                    format!("{n:?} is a pattern; shmbus names are exact, list each name to import"),
                ));
            }
            validate_subject(n).map_err(|e| invalid(key.clone(), format!("{n:?}: {e}")))?;
            if n.split('.').next() == Some("$SYS") {
                return Err(invalid(key, "$SYS names belong to the broker"));
            }
            if let Some(p) = raw.services_export.iter().find(|p| pattern_matches(p, n)) {
                return Err(invalid(
                    key,
                    format!("{n:?} is also exported by services_export {p:?}: the bridge would call itself"),
                ));
            }
        }
        let ms = raw.request_timeout_ms.unwrap_or(DEFAULT_REQUEST_TIMEOUT_MS);
        if ms == 0 || ms > MAX_REQUEST_TIMEOUT_MS {
            return Err(invalid("request_timeout_ms", format!("{ms}: must be 1..={MAX_REQUEST_TIMEOUT_MS}")));
        }
        let queue = raw.queue.unwrap_or(DEFAULT_QUEUE);
        if queue == 0 || queue > 1 << 24 {
            return Err(invalid("queue", format!("{queue}: must be 1..={}", 1 << 24)));
        }
        let inflight = raw.max_inflight_requests.unwrap_or(DEFAULT_MAX_INFLIGHT);
        if inflight == 0 || inflight > 65_536 {
            return Err(invalid("max_inflight_requests", format!("{inflight}: must be 1..=65536")));
        }
        let auth = match (raw.user, raw.password, raw.token, raw.creds, raw.nkey) {
            (None, None, None, None, None) => Auth::None,
            (Some(user), Some(password), None, None, None) => Auth::UserPassword { user, password },
            (Some(_), None, None, None, None) => return Err(invalid("password", "user needs a password")),
            (None, Some(_), None, None, None) => return Err(invalid("user", "password needs a user")),
            (None, None, Some(t), None, None) => Auth::Token(t),
            (None, None, None, Some(c), None) => Auth::Creds(c),
            (None, None, None, None, Some(k)) => Auth::Nkey(k),
            _ => {
                return Err(invalid(
                    "user/password/token/creds/nkey",
                    "choose one way to authenticate: user and password, token, creds or nkey",
                ))
            }
        };
        let client = match (raw.tls_cert, raw.tls_key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            (Some(_), None) => return Err(invalid("tls_key", "tls_cert needs tls_key")),
            (None, Some(_)) => return Err(invalid("tls_cert", "tls_key needs tls_cert")),
        };
        let tls = Tls { required: raw.tls_required.unwrap_or(false), ca: raw.tls_ca, client };
        Ok(Config {
            nats,
            shmbus: raw.shmbus,
            name,
            prefix,
            export: raw.export,
            import: raw.import,
            services_export: raw.services_export,
            services_import: raw.services_import,
            request_timeout: Duration::from_millis(ms),
            queue,
            max_inflight_requests: inflight,
            gap_notices: raw.gap_notices.unwrap_or(true),
            auth,
            tls,
        })
    }
}

/// A bridge name: one token of `[A-Za-z0-9_-]`, 1..=64 bytes.
pub fn check_name(n: &str) -> Result<(), String> {
    if n.is_empty() || n.len() > MAX_NAME_LEN {
        return Err(format!("{n:?}: must be 1..={MAX_NAME_LEN} bytes"));
    }
    if let Some(c) = n.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_')) {
        return Err(format!("{n:?}: {c:?} is not allowed (letters, digits, '-' and '_' only)"));
    }
    Ok(())
}

/// The default name: the hostname's first label, with anything outside
/// `[A-Za-z0-9_-]` made `-`, cut to 64 bytes; `bridge` if nothing is left.
pub fn default_name(hostname: &str) -> String {
    let label = hostname.trim().split('.').next().unwrap_or("");
    let n: String = label
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '-' })
        .take(MAX_NAME_LEN)
        .collect();
    if n.is_empty() {
        "bridge".to_owned()
    } else {
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse_str(text, "host-a.example.org")
    }

    fn err_key(text: &str) -> String {
        match parse(text) {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("expected an Invalid error, got {other:?}"),
        }
    }

    #[test]
    fn the_issue_example_parses_with_defaults() {
        let c = parse(
            r#"
            nats = "nats://127.0.0.1:4222"
            shmbus = "@shmbus"
            prefix = "host1."
            export = ["sensors.>", "logs.*"]
            import = ["commands.>"]
            services_export = ["thermo.>"]
            services_import = ["billing.charge"]
            "#,
        )
        .unwrap();
        assert_eq!(c.nats, vec!["nats://127.0.0.1:4222"]);
        assert_eq!(c.name, "host-a");
        assert_eq!(c.prefix, "host1.");
        assert_eq!(c.request_timeout, Duration::from_millis(DEFAULT_REQUEST_TIMEOUT_MS));
        assert_eq!(c.queue, DEFAULT_QUEUE);
        assert!(c.gap_notices);
        assert_eq!(c.auth, Auth::None);
    }

    #[test]
    fn a_list_of_urls_and_credentials() {
        let c = parse(
            r#"
            nats = ["nats://a:4222", "nats://b:4222"]
            name = "edge_7"
            user = "u"
            password = "p"
            tls_ca = "/etc/ca.pem"
            "#,
        )
        .unwrap();
        assert_eq!(c.nats.len(), 2);
        assert_eq!(c.name, "edge_7");
        assert_eq!(c.auth, Auth::UserPassword { user: "u".into(), password: "p".into() });
        assert_eq!(c.tls.ca.as_deref(), Some(Path::new("/etc/ca.pem")));
    }

    #[test]
    fn unknown_keys_are_errors_that_name_the_key() {
        let e = parse("nats = \"nats://x\"\nexprot = [\"a\"]\n").unwrap_err();
        assert!(matches!(e, ConfigError::Toml { .. }), "{e}");
        assert!(e.to_string().contains("exprot"), "{e}");
        let e = parse("export = [\"a\"]\n").unwrap_err();
        assert!(e.to_string().contains("nats"), "{e}");
    }

    #[test]
    fn every_refusal_names_its_key() {
        assert_eq!(err_key("nats = []"), "nats");
        assert_eq!(err_key("nats = \"nats://x y\""), "nats");
        assert_eq!(err_key("nats = \"n\"\nname = \"a.b\""), "name");
        assert_eq!(err_key("nats = \"n\"\nname = \"\""), "name");
        assert_eq!(err_key("nats = \"n\"\nprefix = \"host1\""), "prefix");
        assert_eq!(err_key("nats = \"n\"\nprefix = \"a.*.\""), "prefix");
        assert_eq!(err_key("nats = \"n\"\nprefix = \"$SYS.\""), "prefix");
        assert_eq!(err_key("nats = \"n\"\nexport = [\"ok\", \"bad..x\"]"), "export[1]");
        assert_eq!(err_key("nats = \"n\"\nimport = [\"a.>.b\"]"), "import[0]");
        assert_eq!(err_key("nats = \"n\"\nimport = [\"$SYS.>\"]"), "import[0]");
        assert_eq!(err_key("nats = \"n\"\nservices_export = [\"a b\"]"), "services_export[0]");
        assert_eq!(err_key("nats = \"n\"\nservices_import = [\"billing.>\"]"), "services_import[0]");
        assert_eq!(err_key("nats = \"n\"\nservices_import = [\"a\", \"$SYS.x\"]"), "services_import[1]");
        assert_eq!(
            err_key("nats = \"n\"\nservices_export = [\"b.>\"]\nservices_import = [\"b.c\"]"),
            "services_import[0]"
        );
        assert_eq!(err_key("nats = \"n\"\nrequest_timeout_ms = 0"), "request_timeout_ms");
        assert_eq!(err_key("nats = \"n\"\nqueue = 0"), "queue");
        assert_eq!(err_key("nats = \"n\"\nmax_inflight_requests = 0"), "max_inflight_requests");
        assert_eq!(err_key("nats = \"n\"\nuser = \"u\""), "password");
        assert_eq!(
            err_key("nats = \"n\"\ntoken = \"t\"\nuser = \"u\"\npassword = \"p\""),
            "user/password/token/creds/nkey"
        );
        assert_eq!(err_key("nats = \"n\"\ntls_cert = \"/c\""), "tls_key");
        assert_eq!(err_key("nats = \"n\"\nshmbus = \"\""), "shmbus");
    }

    #[test]
    fn the_default_name_is_a_clean_token() {
        assert_eq!(default_name("host-a.example.org"), "host-a");
        assert_eq!(default_name("we ird!"), "we-ird-");
        assert_eq!(default_name(""), "bridge");
        assert_eq!(default_name(&"x".repeat(200)).len(), MAX_NAME_LEN);
        assert!(check_name(&default_name("ünï.x")).is_ok());
    }
}
