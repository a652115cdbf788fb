//! The route file: loaded from YAML plus `OBOE_*` environment overrides, then
//! turned into a validated, typed [`Config`].
//!
//! Loading happens in two stages, as ripgrep and vector do it: `raw` holds the
//! file as written, `validate` checks it and reports *every* problem at once,
//! each with its key path (`routes[1].upstream: ...`). Only this module knows
//! about figment and YAML.

mod raw;
mod types;
mod validate;

use std::fmt;
use std::path::Path;

use figment::Figment;
use figment::providers::{Env, Format};

pub use raw::RawConfig;
pub use types::*;
pub use validate::{RESERVED_PREFIX, check_node_url, check_redis_url, is_guid};

/// Top-level keys that `OBOE_*` variables may override. Other `OBOE_` variables
/// (`OBOE_CONFIG`, `OBOE_LOG`, secrets referenced with `{ env: ... }`) are not config keys.
const TOP_LEVEL_KEYS: &[&str] = &[
    "listen",
    "admin",
    "shutdown_grace",
    "limits",
    "upstream",
    "identity",
    "inbound",
    "cache",
    "telemetry",
];

/// One problem found in a route file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where: `routes[0].upstream`, or empty for the whole file.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// A route file that cannot be used, with every problem found in it.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    /// Every problem, in file order where known.
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration ({} problem", self.problems.len())?;
        if self.problems.len() != 1 {
            f.write_str("s")?;
        }
        f.write_str(")")?;
        for problem in &self.problems {
            write!(f, "\n  - {problem}")?;
        }
        Ok(())
    }
}

impl ConfigError {
    fn one(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            problems: vec![Problem {
                path: path.into(),
                message: message.into(),
            }],
        }
    }
}

/// Loads and validates the route file at `path`, with `OBOE_*` overrides from the
/// process environment.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::one("", format!("read route file {}: {e}", path.display())))?;
    load_str(&text, Env::prefixed("OBOE_"))
}

/// Loads and validates a route file given as text. `env` supplies overrides;
/// tests pass an empty provider.
pub fn load_str(text: &str, env: Env) -> Result<Config, ConfigError> {
    let env = env.split("__").filter(|key| {
        let top = key.as_str().split('.').next().unwrap_or_default();
        TOP_LEVEL_KEYS.iter().any(|k| k.eq_ignore_ascii_case(top))
    });
    let figment = Figment::new()
        .merge(serde_saphyr::figment::Yaml::string(text))
        .merge(env);
    let (raw, mut problems) = parse_raw(&figment)?;
    match validate::validate(raw) {
        Ok(config) if problems.is_empty() => Ok(config),
        Ok(_) => Err(ConfigError { problems }),
        Err(e) => {
            problems.extend(e.problems);
            Err(ConfigError { problems })
        }
    }
}

/// Stage one: syntax and shape. Unknown keys are collected (all of them) and
/// returned beside the parsed file, so validation still reports the rest. A
/// value of the wrong type is reported and then treated as absent, so one
/// typo'd number does not hide every other problem in the file.
fn parse_raw(figment: &Figment) -> Result<(RawConfig, Vec<Problem>), ConfigError> {
    let mut value: figment::value::Value = figment.extract().map_err(figment_problems)?;
    let mut problems = Vec::new();
    // Each round removes the values serde refused; a file cannot have more
    // wrong-typed values than keys, and the bound keeps a bug from looping.
    let raw = loop {
        let mut unknown = Vec::new();
        let parsed: Result<RawConfig, _> =
            serde_ignored::deserialize(&value, |path| unknown.push(render_ignored_path(&path)));
        if let Ok(raw) = parsed {
            problems.extend(unknown.into_iter().map(|path| Problem {
                path,
                message: "unknown key".to_owned(),
            }));
            break raw;
        }
        // figment's own extraction reports the key path of a type error.
        let retry = Figment::from(figment::providers::Serialized::defaults(&value));
        let Err(error) = retry.extract::<RawConfig>() else {
            continue;
        };
        let mut removed_any = false;
        for e in error {
            removed_any |= remove_path(&mut value, &e.path);
            problems.push(Problem {
                path: render_figment_path(&e.path),
                message: e.kind.to_string(),
            });
        }
        if !removed_any || problems.len() > 256 {
            return Err(ConfigError { problems });
        }
    };
    Ok((raw, problems))
}

/// Removes the value at `path` (map keys and array indices); true if one was removed.
fn remove_path(value: &mut figment::value::Value, path: &[String]) -> bool {
    use figment::value::Value;
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut at = value;
    for segment in parents {
        at = match at {
            Value::Dict(_, dict) => match dict.get_mut(segment) {
                Some(v) => v,
                None => return false,
            },
            Value::Array(_, items) => {
                match segment.parse::<usize>().ok().and_then(|i| items.get_mut(i)) {
                    Some(v) => v,
                    None => return false,
                }
            }
            _ => return false,
        };
    }
    match at {
        Value::Dict(_, dict) => dict.remove(last).is_some(),
        Value::Array(_, items) => match last.parse::<usize>() {
            // An array element cannot be absent; replace it with an empty map so
            // that the other elements keep their indices.
            Ok(i) if i < items.len() => {
                items[i] = Value::from(figment::value::Dict::new());
                true
            }
            _ => false,
        },
        _ => false,
    }
}

fn figment_problems(error: figment::Error) -> ConfigError {
    ConfigError {
        problems: error
            .into_iter()
            .map(|e| Problem {
                path: render_figment_path(&e.path),
                message: e.kind.to_string(),
            })
            .collect(),
    }
}

/// `["routes", "0", "timeout"]` → `routes[0].timeout`.
fn render_figment_path(path: &[String]) -> String {
    let mut out = String::new();
    for segment in path {
        if segment.bytes().all(|b| b.is_ascii_digit()) && !segment.is_empty() {
            out.push_str(&format!("[{segment}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(segment);
        }
    }
    out
}

/// `routes.0.nmae` → `routes[0].nmae`, the form every other problem uses.
fn render_ignored_path(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path as P;
    match path {
        P::Root => String::new(),
        P::Seq { parent, index } => format!("{}[{index}]", render_ignored_path(parent)),
        P::Map { parent, key } => {
            let parent = render_ignored_path(parent);
            if parent.is_empty() {
                key.clone()
            } else {
                format!("{parent}.{key}")
            }
        }
        P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => {
            render_ignored_path(parent)
        }
    }
}

/// The JSON Schema of the route file, generated from the raw structs.
pub fn schema() -> serde_json::Value {
    let schema = schemars::schema_for!(RawConfig);
    serde_json::to_value(schema).unwrap_or_default()
}
