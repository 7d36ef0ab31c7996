//! Configuration loading shared by every vmeter binary, on the `config` crate.
//!
//! Three layers, each over the one before: the binary's built-in defaults, one YAML file
//! (its own typed struct, `deny_unknown_fields` everywhere), then environment overrides
//! `VMETER_<SECTION>__<KEY>` (nested keys joined by `__`, case-insensitive). Rules:
//! - `--config PATH` given: the file must exist and parse. Not given: the binary's default path
//!   is read if it exists, otherwise every key takes its built-in default.
//! - Errors in the file name the file, the line and column, and the key path: the file is
//!   checked on its own with `serde_yaml_ng` before the layers are merged (the `config`
//!   crate's own YAML errors have no line numbers, env-spike.md §6.1).
//! - An override's value is read as YAML (`5`, `true`, `[a, b]`, `"007"` for a string of
//!   digits): the `config` crate's own environment source would read `007` as the number 7,
//!   so the overrides are a source of ours ([`Overrides`]) that keeps this rule.
//! - Overrides for sections this binary does not have are ignored (one environment file can
//!   serve all services on a host); an unknown key inside a known section is an error that
//!   names the variables.

use std::path::{Path, PathBuf};

use config::{FileFormat, Value as Layered, ValueKind};
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
    let internal = |e: config::ConfigError| ConfigError::Invalid {
        origin: "defaults".into(),
        key: "-".into(),
        message: e.to_string(),
    };
    // 1. The built-in defaults.
    let mut layers = config::Config::builder()
        .add_source(config::Config::try_from(&T::default()).map_err(internal)?);
    // 2. The file, checked on its own first: its errors carry line, column and the key path.
    if let Some(p) = &path {
        let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
            path: p.clone(),
            source,
        })?;
        if !text.trim().is_empty() {
            serde_yaml_ng::from_str::<T>(&text).map_err(|e| ConfigError::Parse {
                path: p.clone(),
                message: e.to_string(),
            })?;
            layers = layers.add_source(config::File::from_str(&text, FileFormat::Yaml));
        }
    }
    // 3. The environment's overrides of this binary's sections.
    let overrides = Overrides::from_env::<T>(env);
    let vars = overrides.names();
    layers = layers.add_source(overrides);
    let merged = layers
        .build()
        .and_then(|c| c.try_deserialize::<T>())
        .map_err(|e| match &path {
            // The file alone deserialised above: what fails now came with the overrides.
            _ if !vars.is_empty() => ConfigError::Env {
                vars: vars.clone(),
                message: e.to_string(),
            },
            Some(p) => ConfigError::Parse {
                path: p.clone(),
                message: e.to_string(),
            },
            None => internal(e),
        })?;
    Ok((merged, path))
}

/// The `VMETER_<SECTION>__<KEY>` overrides of the sections `T` has, each value read as YAML:
/// a `config` source whose values name their variable as their origin.
#[derive(Debug, Clone, Default)]
struct Overrides {
    /// (variable, key path in lower case, value), sorted by variable.
    vars: Vec<(String, Vec<String>, Value)>,
}

impl Overrides {
    fn from_env<T: Serialize + Default>(env: impl IntoIterator<Item = (String, String)>) -> Self {
        let sections = known_sections::<T>();
        let mut vars = Vec::new();
        for (name, raw) in env {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let keys: Vec<String> = rest.split("__").map(|k| k.to_ascii_lowercase()).collect();
            if keys.len() < 2 || keys.iter().any(|k| k.is_empty()) || !sections.contains(&keys[0]) {
                continue;
            }
            let value =
                serde_yaml_ng::from_str::<Value>(&raw).unwrap_or(Value::String(raw.clone()));
            let value = if value.is_null() && !raw.trim().is_empty() {
                Value::String(raw)
            } else {
                value
            };
            vars.push((name, keys, value));
        }
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        Overrides { vars }
    }

    /// The variables applied, for error messages.
    fn names(&self) -> String {
        let names: Vec<&str> = self.vars.iter().map(|v| v.0.as_str()).collect();
        names.join(", ")
    }
}

impl config::Source for Overrides {
    fn clone_into_box(&self) -> Box<dyn config::Source + Send + Sync> {
        Box::new(self.clone())
    }

    fn collect(&self) -> Result<config::Map<String, Layered>, config::ConfigError> {
        let mut root = config::Map::new();
        for (name, keys, value) in &self.vars {
            let origin = format!("environment variable {name}");
            let (last, parents) = keys.split_last().expect("two keys or more");
            let mut table = &mut root;
            for k in parents {
                let entry = table.entry(k.clone()).or_insert_with(|| {
                    Layered::new(Some(&origin), config::Map::<String, Layered>::new())
                });
                if !matches!(entry.kind, ValueKind::Table(_)) {
                    *entry = Layered::new(Some(&origin), config::Map::<String, Layered>::new());
                }
                let ValueKind::Table(t) = &mut entry.kind else {
                    unreachable!("made a table above")
                };
                table = t;
            }
            table.insert(last.clone(), layered(value, &origin));
        }
        Ok(root)
    }
}

/// A YAML value as a `config` value from `origin`.
fn layered(v: &Value, origin: &String) -> Layered {
    let kind = match v {
        Value::Null => ValueKind::Nil,
        Value::Bool(b) => ValueKind::Boolean(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                ValueKind::I64(i)
            } else if let Some(u) = n.as_u64() {
                ValueKind::U64(u)
            } else {
                ValueKind::Float(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Value::String(s) => ValueKind::String(s.clone()),
        Value::Sequence(items) => {
            ValueKind::Array(items.iter().map(|i| layered(i, origin)).collect())
        }
        Value::Mapping(m) => ValueKind::Table(
            m.iter()
                .map(|(k, v)| {
                    let key = match k {
                        Value::String(s) => s.clone(),
                        other => serde_yaml_ng::to_string(other)
                            .unwrap_or_default()
                            .trim()
                            .to_string(),
                    };
                    (key, layered(v, origin))
                })
                .collect(),
        ),
        Value::Tagged(t) => return layered(&t.value, origin),
    };
    Layered::new(Some(origin), kind)
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
        tokens: std::collections::BTreeMap<String, String>,
        hosts: Vec<String>,
        ratio: Option<f64>,
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

    #[test]
    fn layers_keep_map_keys_as_written_and_read_lists_from_the_environment() {
        let f =
            file("agent:\n  interval_secs: 30\n  tokens: {AbC.d-1: p1, lower: p2}\n  hosts: [a]\n");
        let env = vec![
            ("VMETER_AGENT__HOSTS".to_string(), "[x, y]".to_string()),
            ("VMETER_AGENT__RATIO".to_string(), "0.5".to_string()),
        ];
        let (c, _): (Cfg, _) = load_with_env(Some(&f.0), Path::new("/x"), env).unwrap();
        assert_eq!(c.agent.interval_secs, 30, "the file over the default");
        assert_eq!(
            c.broker.prefetch, 100,
            "the default where the file is silent"
        );
        assert_eq!(
            c.agent.tokens.get("AbC.d-1").map(String::as_str),
            Some("p1")
        );
        assert_eq!(c.agent.tokens.len(), 2);
        assert_eq!(c.agent.hosts, ["x", "y"], "the environment over the file");
        assert_eq!(c.agent.ratio, Some(0.5));
    }

    #[test]
    fn env_bad_type_names_the_variable_and_key() {
        let env = vec![("VMETER_BROKER__PREFETCH".to_string(), "many".to_string())];
        let e = load_with_env::<Cfg, _>(None, Path::new("/x"), env)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("VMETER_BROKER__PREFETCH") && e.contains("broker.prefetch"),
            "{e}"
        );
    }
}
