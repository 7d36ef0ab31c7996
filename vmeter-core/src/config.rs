//! Configuration loading shared by every vmeter binary.
//!
//! Each binary reads one YAML file (its own typed struct, `deny_unknown_fields` everywhere)
//! and then applies environment overrides `VMETER_<SECTION>__<KEY>` (nested keys joined by
//! `__`, case-insensitive). Rules:
//! - `--config PATH` given: the file must exist and parse. Not given: the binary's default path
//!   is read if it exists, otherwise every key takes its built-in default.
//! - Errors in the file name the file, the line and column, and the key path.
//! - An override's value is read as YAML (`5`, `true`, `[a, b]`, `"007"` for a string of digits).
//! - Overrides for sections this binary does not have are ignored (one environment file can
//!   serve all services on a host); an unknown key inside a known section is an error.
//!
//! The `config` crate was not used: it loses line numbers for type errors (env-spike.md §6.1).

use std::path::{Path, PathBuf};

use serde::{Serialize, de::DeserializeOwned};
use serde_yaml_ng::Value;

/// Prefix of environment overrides.
pub const ENV_PREFIX: &str = "VMETER_";

/// A configuration that could not be loaded. The message is meant for an operator's terminal.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file does not parse or does not fit the schema; the message has line, column and key.
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// An environment override does not fit the schema.
    #[error("environment override ({vars}): {message}")]
    Env { vars: String, message: String },
    /// A value parsed but is not acceptable (checked after parsing).
    #[error("config {origin}: {key}: {message}")]
    Invalid {
        origin: String,
        key: String,
        message: String,
    },
}

/// Loads `T` from `explicit` (must exist) or `default_path` (optional), then applies overrides
/// from the process environment. Returns the config and the file actually read, if any.
pub fn load<T>(
    explicit: Option<&Path>,
    default_path: &Path,
) -> Result<(T, Option<PathBuf>), ConfigError>
where
    T: DeserializeOwned + Serialize + Default,
{
    load_with_env(explicit, default_path, std::env::vars())
}

/// [`load`] with an explicit environment, for tests.
pub fn load_with_env<T, I>(
    explicit: Option<&Path>,
    default_path: &Path,
    env: I,
) -> Result<(T, Option<PathBuf>), ConfigError>
where
    T: DeserializeOwned + Serialize + Default,
    I: IntoIterator<Item = (String, String)>,
{
    let path = match explicit {
        Some(p) => Some(p.to_path_buf()),
        None if default_path.exists() => Some(default_path.to_path_buf()),
        None => None,
    };
    let (mut tree, parsed): (Value, T) = match &path {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.clone(),
                source,
            })?;
            if text.trim().is_empty() {
                (Value::Mapping(Default::default()), T::default())
            } else {
                let parse_err = |e: serde_yaml_ng::Error| ConfigError::Parse {
                    path: p.clone(),
                    message: e.to_string(),
                };
                // Typed parse first: its errors carry line, column and the key path.
                let typed: T = serde_yaml_ng::from_str(&text).map_err(parse_err)?;
                let tree: Value = serde_yaml_ng::from_str(&text).map_err(parse_err)?;
                (tree, typed)
            }
        }
        None => (Value::Mapping(Default::default()), T::default()),
    };

    let sections = known_sections::<T>();
    let mut applied = Vec::new();
    let mut env: Vec<(String, String)> = env.into_iter().collect();
    env.sort();
    for (name, raw) in env {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let keys: Vec<String> = rest.split("__").map(|k| k.to_ascii_lowercase()).collect();
        if keys.len() < 2 || keys.iter().any(|k| k.is_empty()) || !sections.contains(&keys[0]) {
            continue;
        }
        let value = serde_yaml_ng::from_str::<Value>(&raw).unwrap_or(Value::String(raw.clone()));
        let value = if value.is_null() && !raw.trim().is_empty() {
            Value::String(raw)
        } else {
            value
        };
        set_path(&mut tree, &keys, value);
        applied.push(name);
    }
    if applied.is_empty() {
        return Ok((parsed, path));
    }
    let merged: T = serde_yaml_ng::from_value(tree).map_err(|e| ConfigError::Env {
        vars: applied.join(", "),
        message: e.to_string(),
    })?;
    Ok((merged, path))
}

fn known_sections<T: Serialize + Default>() -> Vec<String> {
    match serde_yaml_ng::to_value(T::default()) {
        Ok(Value::Mapping(m)) => m
            .keys()
            .filter_map(|k| k.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}

fn set_path(tree: &mut Value, keys: &[String], value: Value) {
    if !tree.is_mapping() {
        *tree = Value::Mapping(Default::default());
    }
    let map = tree.as_mapping_mut().expect("just made a mapping");
    let key = Value::String(keys[0].clone());
    if keys.len() == 1 {
        map.insert(key, value);
        return;
    }
    let child = map.entry(key).or_insert(Value::Mapping(Default::default()));
    set_path(child, &keys[1..], value);
}

/// Where a binary looks for its config file when `--config` is not given.
pub fn default_path(binary: &str) -> PathBuf {
    PathBuf::from(format!("/etc/vmeter/{binary}.yaml"))
}

/// The credentials `deploy/setup.sh` made on this host (`KEY=value` lines of
/// `$VMETER_CREDENTIALS`, default `/etc/vmeter/credentials.env`), for the test suite,
/// the benchmarks and the scripts that reach the local broker and database. Empty when the
/// file is missing or unreadable (not root).
pub fn local_credentials() -> std::collections::HashMap<String, String> {
    let path = std::env::var("VMETER_CREDENTIALS")
        .unwrap_or_else(|_| "/etc/vmeter/credentials.env".into());
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// URLs of the local broker's vhost and database as the user `role` of
/// [`local_credentials`] (`ADMIN`, `AGENT`, `NOTIFICATION`, `COLLECTOR` for RabbitMQ):
/// `VMETER_TEST_AMQP_URL` / `VMETER_TEST_PG_URL` when set, else built from the file.
pub fn local_amqp_url(role: &str) -> String {
    if role == "ADMIN"
        && let Ok(u) = std::env::var("VMETER_TEST_AMQP_URL")
    {
        return u;
    }
    let c = local_credentials();
    let get = |k: &str| c.get(k).cloned().unwrap_or_default();
    let vhost = c
        .get("MQ_VHOST")
        .map_or("/vmeter", String::as_str)
        .replace('/', "%2f");
    format!(
        "amqp://{}:{}@127.0.0.1:5672/{vhost}",
        get(&format!("MQ_{role}_USER")),
        get(&format!("MQ_{role}_PASSWORD"))
    )
}

/// The local database as [`local_credentials`]' role (see [`local_amqp_url`]).
pub fn local_pg_url() -> String {
    if let Ok(u) = std::env::var("VMETER_TEST_PG_URL") {
        return u;
    }
    let c = local_credentials();
    let get = |k: &str| c.get(k).cloned().unwrap_or_default();
    format!(
        "postgres://{}:{}@127.0.0.1:5432/vmeter",
        get("DB_USER"),
        get("DB_PASSWORD")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::io::Write;

    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Cfg {
        broker: Broker,
        agent: Agent,
    }
    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Broker {
        url: String,
        prefetch: u16,
    }
    impl Default for Broker {
        fn default() -> Self {
            Broker {
                url: "amqp://default".into(),
                prefetch: 100,
            }
        }
    }
    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Agent {
        interval_secs: u64,
        secret: String,
    }

    fn file(text: &str) -> tempfile_lite::TempFile {
        let f = tempfile_lite::TempFile::new();
        std::fs::File::create(&f.0)
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        f
    }

    mod tempfile_lite {
        pub struct TempFile(pub std::path::PathBuf);
        impl TempFile {
            pub fn new() -> Self {
                let p =
                    std::env::temp_dir().join(format!("vmeter-cfg-{}.yaml", uuid::Uuid::new_v4()));
                TempFile(p)
            }
        }
        impl Drop for TempFile {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    fn none() -> Vec<(String, String)> {
        Vec::new()
    }

    #[test]
    fn defaults_when_no_file() {
        let (c, p): (Cfg, _) =
            load_with_env(None, Path::new("/nonexistent/x.yaml"), none()).unwrap();
        assert_eq!(c, Cfg::default());
        assert!(p.is_none());
    }

    #[test]
    fn explicit_missing_file_is_an_error() {
        let e = load_with_env::<Cfg, _>(
            Some(Path::new("/nonexistent/x.yaml")),
            Path::new("/x"),
            none(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/x.yaml"), "{e}");
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let f = file("broker:\n  url: amqp://x\n  prefetchh: 5\n");
        let e = load_with_env::<Cfg, _>(Some(&f.0), Path::new("/x"), none())
            .unwrap_err()
            .to_string();
        assert!(e.contains(f.0.to_str().unwrap()), "{e}");
        assert!(e.contains("line 3"), "{e}");
        assert!(e.contains("prefetchh"), "{e}");
        assert!(e.contains("broker"), "{e}");
    }

    #[test]
    fn bad_type_names_line_and_key() {
        let f = file("agent:\n  interval_secs: sixty\n");
        let e = load_with_env::<Cfg, _>(Some(&f.0), Path::new("/x"), none())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 2") && e.contains("agent.interval_secs"),
            "{e}"
        );
    }

    #[test]
    fn env_overrides_file_and_ignores_foreign_sections() {
        let f = file("broker:\n  url: amqp://file\n");
        let env = vec![
            ("VMETER_BROKER__PREFETCH".to_string(), "7".to_string()),
            ("VMETER_AGENT__SECRET".to_string(), "\"007\"".to_string()),
            (
                "VMETER_COLLECTOR__DATABASE_URL".to_string(),
                "postgres://x".to_string(),
            ),
            ("VMETER_CONFIG".to_string(), "/etc/x".to_string()),
            ("OTHER".to_string(), "1".to_string()),
        ];
        let (c, _): (Cfg, _) = load_with_env(Some(&f.0), Path::new("/x"), env).unwrap();
        assert_eq!(c.broker.url, "amqp://file");
        assert_eq!(c.broker.prefetch, 7);
        assert_eq!(c.agent.secret, "007");
    }

    #[test]
    fn env_unknown_key_in_known_section_is_an_error() {
        let env = vec![("VMETER_BROKER__URLL".to_string(), "x".to_string())];
        let e = load_with_env::<Cfg, _>(None, Path::new("/x"), env)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("VMETER_BROKER__URLL") && e.contains("urll"),
            "{e}"
        );
    }
}
