//! Appservice registration files: the standard YAML that bridges ship and homeservers load.
//!
//! Every file is checked on its own (required fields, types) and then against the others
//! (unique `id` and `as_token`). Each error names the file and the field.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use regex::Regex;
use serde_json::Value;

/// One namespace entry: a regular expression and whether the appservice claims it exclusively.
#[derive(Clone, Debug)]
pub struct Namespace {
    /// The pattern as written in the file.
    pub regex: String,
    /// The pattern compiled, anchored at both ends as homeservers match it against whole ids.
    pub compiled: Regex,
    /// Whether only this appservice may use names that match.
    pub exclusive: bool,
}

/// The `namespaces` of a registration.
#[derive(Clone, Debug, Default)]
pub struct Namespaces {
    /// User ids the appservice is interested in.
    pub users: Vec<Namespace>,
    /// Room aliases the appservice is interested in.
    pub aliases: Vec<Namespace>,
    /// Room ids the appservice is interested in.
    pub rooms: Vec<Namespace>,
}

/// A checked appservice registration.
#[derive(Clone, Debug)]
pub struct Registration {
    /// The unique id of the appservice.
    pub id: String,
    /// Where transactions go; `None` when the file says `url: null` (no traffic at all).
    pub url: Option<String>,
    /// The token the appservice uses towards the homeserver.
    pub as_token: String,
    /// The token the homeserver sends to the appservice.
    pub hs_token: String,
    /// The localpart of the appservice's own user.
    pub sender_localpart: String,
    /// The ids the appservice is interested in.
    pub namespaces: Namespaces,
    /// Whether users of the appservice are rate limited (the spec's default is true).
    pub rate_limited: bool,
    /// Third-party protocols the appservice bridges.
    pub protocols: Vec<String>,
    /// Whether the appservice asked for ephemeral events.
    pub receive_ephemeral: bool,
    /// The file the registration came from.
    pub source: PathBuf,
}

impl Registration {
    /// Whether `user_id` falls in the appservice's users namespace or is its own user.
    pub fn is_interested_in_user(&self, user_id: &str, server_name: &str) -> bool {
        let own = format!("@{}:{server_name}", self.sender_localpart);
        user_id == own
            || self
                .namespaces
                .users
                .iter()
                .any(|ns| ns.compiled.is_match(user_id))
    }

    /// Whether `room_id` falls in the appservice's rooms namespace.
    pub fn is_interested_in_room(&self, room_id: &str) -> bool {
        self.namespaces
            .rooms
            .iter()
            .any(|ns| ns.compiled.is_match(room_id))
    }
}

/// Reads registration files: each path is a YAML file, or a directory whose `*.yaml` and
/// `*.yml` files are read in name order. Ids and `as_token`s must be unique across all files.
pub fn load(paths: &[PathBuf]) -> anyhow::Result<Vec<Registration>> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            files.extend(yaml_files_in(path)?);
        } else {
            files.push(path.clone());
        }
    }
    if files.is_empty() {
        bail!("no registration files found in {}", display_paths(paths));
    }
    // Every file is checked, so that one run names every file to fix.
    let mut registrations = Vec::with_capacity(files.len());
    let mut errors = Vec::new();
    for file in &files {
        let parsed = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read registration file {}", file.display()))
            .and_then(|text| parse(&text, file));
        match parsed {
            Ok(registration) => registrations.push(registration),
            Err(error) => errors.push(error),
        }
    }
    if errors.len() == 1 {
        return Err(errors.remove(0));
    }
    if !errors.is_empty() {
        let lines: Vec<String> = errors.iter().map(|e| format!("  {e:#}")).collect();
        bail!(
            "{} registration files are not valid:\n{}",
            errors.len(),
            lines.join("\n")
        );
    }
    check_unique(&registrations)?;
    Ok(registrations)
}

fn yaml_files_in(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read registration directory {}", dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        let is_yaml = path.extension().is_some_and(|e| e == "yaml" || e == "yml");
        if is_yaml && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn display_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Parses and checks one registration; `source` names the file in errors.
pub fn parse(text: &str, source: &Path) -> anyhow::Result<Registration> {
    let file = source.display();
    let value: Value =
        serde_saphyr::from_str(text).map_err(|e| anyhow::anyhow!("{file}: not valid YAML: {e}"))?;
    let Value::Object(map) = value else {
        bail!(
            "{file}: a registration must be a YAML mapping of fields, found {}",
            kind(&value)
        );
    };
    let field = Fields {
        map: &map,
        file: &file.to_string(),
    };
    let id = field.string("id")?;
    if id.is_empty() || id.contains('|') {
        bail!("{file}: field `id` must be non-empty and must not contain `|`");
    }
    let url = field.url()?;
    let sender_localpart = field.string("sender_localpart")?;
    if sender_localpart.is_empty() || !sender_localpart.chars().all(is_localpart_char) {
        bail!(
            "{file}: field `sender_localpart` must be a non-empty user localpart (a-z, 0-9, ._=-/+)"
        );
    }
    Ok(Registration {
        url,
        as_token: field.token("as_token")?,
        hs_token: field.token("hs_token")?,
        sender_localpart,
        namespaces: field.namespaces()?,
        rate_limited: field.optional_bool("rate_limited")?.unwrap_or(true),
        protocols: field.protocols()?,
        receive_ephemeral: field.optional_bool("receive_ephemeral")?.unwrap_or(false),
        source: source.to_path_buf(),
        id,
    })
}

fn is_localpart_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || "._=-/+".contains(c)
}

/// Typed access to a registration's fields, with errors that name the file and field.
struct Fields<'a> {
    map: &'a serde_json::Map<String, Value>,
    file: &'a str,
}

impl Fields<'_> {
    fn string(&self, name: &str) -> anyhow::Result<String> {
        match self.map.get(name) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => bail!(
                "{}: field `{name}` must be a string, found {}",
                self.file,
                kind(other)
            ),
            None => bail!("{}: missing required field `{name}`", self.file),
        }
    }

    /// A token: a non-empty string (an empty one would authenticate anyone who sends none).
    fn token(&self, name: &str) -> anyhow::Result<String> {
        let token = self.string(name)?;
        if token.is_empty() {
            bail!("{}: field `{name}` must not be empty", self.file);
        }
        Ok(token)
    }

    fn url(&self) -> anyhow::Result<Option<String>> {
        match self.map.get("url") {
            Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => {
                let ok = (s.starts_with("http://") || s.starts_with("https://"))
                    && reqwest::Url::parse(s).is_ok();
                if !ok {
                    bail!(
                        "{}: field `url` must be an http:// or https:// URL, found {s:?}",
                        self.file
                    );
                }
                Ok(Some(s.trim_end_matches('/').to_owned()))
            }
            Some(other) => bail!(
                "{}: field `url` must be a string or null, found {}",
                self.file,
                kind(other)
            ),
            None => bail!(
                "{}: missing required field `url` (write `url: null` for an appservice that receives no traffic)",
                self.file
            ),
        }
    }

    fn optional_bool(&self, name: &str) -> anyhow::Result<Option<bool>> {
        match self.map.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => bail!(
                "{}: field `{name}` must be true or false, found {}",
                self.file,
                kind(other)
            ),
        }
    }

    fn protocols(&self) -> anyhow::Result<Vec<String>> {
        match self.map.get("protocols") {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, item)| match item {
                    Value::String(s) => Ok(s.clone()),
                    other => bail!(
                        "{}: field `protocols[{i}]` must be a string, found {}",
                        self.file,
                        kind(other)
                    ),
                })
                .collect(),
            Some(other) => bail!(
                "{}: field `protocols` must be a list of strings, found {}",
                self.file,
                kind(other)
            ),
        }
    }

    fn namespaces(&self) -> anyhow::Result<Namespaces> {
        let map = match self.map.get("namespaces") {
            Some(Value::Object(map)) => map,
            Some(other) => bail!(
                "{}: field `namespaces` must be a mapping, found {}",
                self.file,
                kind(other)
            ),
            None => bail!("{}: missing required field `namespaces`", self.file),
        };
        Ok(Namespaces {
            users: self.namespace_list(map, "users")?,
            aliases: self.namespace_list(map, "aliases")?,
            rooms: self.namespace_list(map, "rooms")?,
        })
    }

    fn namespace_list(
        &self,
        map: &serde_json::Map<String, Value>,
        name: &str,
    ) -> anyhow::Result<Vec<Namespace>> {
        let items = match map.get(name) {
            None | Some(Value::Null) => return Ok(Vec::new()),
            Some(Value::Array(items)) => items,
            Some(other) => bail!(
                "{}: field `namespaces.{name}` must be a list, found {}",
                self.file,
                kind(other)
            ),
        };
        items
            .iter()
            .enumerate()
            .map(|(i, item)| self.namespace(item, &format!("namespaces.{name}[{i}]")))
            .collect()
    }

    fn namespace(&self, item: &Value, path: &str) -> anyhow::Result<Namespace> {
        let Value::Object(entry) = item else {
            bail!(
                "{}: field `{path}` must be a mapping with `regex` and `exclusive`, found {}",
                self.file,
                kind(item)
            );
        };
        let regex = match entry.get("regex") {
            Some(Value::String(s)) => s.clone(),
            Some(other) => bail!(
                "{}: field `{path}.regex` must be a string, found {}",
                self.file,
                kind(other)
            ),
            None => bail!("{}: missing required field `{path}.regex`", self.file),
        };
        let exclusive = match entry.get("exclusive") {
            Some(Value::Bool(b)) => *b,
            Some(other) => bail!(
                "{}: field `{path}.exclusive` must be true or false, found {}",
                self.file,
                kind(other)
            ),
            None => bail!("{}: missing required field `{path}.exclusive`", self.file),
        };
        // The regex as written is checked first, so that an error quotes it, not the anchored
        // form the matcher uses.
        let compiled = Regex::new(&regex)
            .and_then(|_| Regex::new(&format!("^(?:{regex})$")))
            .map_err(|e| {
                anyhow::anyhow!(
                    "{}: field `{path}.regex` is not a supported regular expression: {e}",
                    self.file
                )
            })?;
        Ok(Namespace {
            regex,
            compiled,
            exclusive,
        })
    }
}

/// Refuses two registrations with the same `id` or the same `as_token`.
fn check_unique(registrations: &[Registration]) -> anyhow::Result<()> {
    let mut ids: BTreeMap<&str, &Path> = BTreeMap::new();
    let mut tokens: BTreeMap<&str, &Path> = BTreeMap::new();
    for r in registrations {
        if let Some(first) = ids.insert(&r.id, &r.source) {
            bail!(
                "{}: field `id` {:?} is already used by {}",
                r.source.display(),
                r.id,
                first.display()
            );
        }
        if let Some(first) = tokens.insert(&r.as_token, &r.source) {
            bail!(
                "{}: field `as_token` is already used by {} (every appservice needs its own)",
                r.source.display(),
                first.display()
            );
        }
    }
    Ok(())
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "id: telegram\nurl: http://127.0.0.1:9001/\nas_token: a1\nhs_token: h1\nsender_localpart: telegrambot\nnamespaces:\n  users:\n    - regex: '@telegram_.*:example.org'\n      exclusive: yes\n  rooms: []\n";

    fn parse_str(text: &str) -> anyhow::Result<Registration> {
        parse(text, Path::new("reg.yaml"))
    }

    /// A standard file parses; the URL loses its trailing slash, YAML 1.1 `yes` is true.
    #[test]
    fn standard_registration_parses() {
        let r = parse_str(GOOD).unwrap();
        assert_eq!(r.id, "telegram");
        assert_eq!(r.url.as_deref(), Some("http://127.0.0.1:9001"));
        assert!(r.namespaces.users[0].exclusive);
        assert!(r.is_interested_in_user("@telegram_42:example.org", "example.org"));
        assert!(r.is_interested_in_user("@telegrambot:example.org", "example.org"));
        assert!(!r.is_interested_in_user("@alice:example.org", "example.org"));
        assert!(r.rate_limited);
    }

    /// `url: null` means no traffic; a missing `url` is an error that says how to ask for that.
    #[test]
    fn url_null_is_no_traffic_and_missing_url_is_refused() {
        let null = GOOD.replace("url: http://127.0.0.1:9001/", "url: null");
        assert_eq!(parse_str(&null).unwrap().url, None);
        let missing = GOOD.replace("url: http://127.0.0.1:9001/\n", "");
        let err = parse_str(&missing).unwrap_err().to_string();
        assert_eq!(
            err,
            "reg.yaml: missing required field `url` (write `url: null` for an appservice that receives no traffic)"
        );
    }

    /// Each mistyped or missing field is named in the error.
    #[test]
    fn mistyped_fields_are_named() {
        let cases = [
            (
                GOOD.replace("id: telegram", "id: 42"),
                "reg.yaml: field `id` must be a string, found a number",
            ),
            (
                GOOD.replace("hs_token: h1", "hs_token: ''"),
                "reg.yaml: field `hs_token` must not be empty",
            ),
            (
                GOOD.replace("as_token: a1\n", ""),
                "reg.yaml: missing required field `as_token`",
            ),
            (
                GOOD.replace("url: http://127.0.0.1:9001/", "url: 5"),
                "reg.yaml: field `url` must be a string or null, found a number",
            ),
            (
                GOOD.replace("url: http://127.0.0.1:9001/", "url: ftp://x"),
                "reg.yaml: field `url` must be an http:// or https:// URL, found \"ftp://x\"",
            ),
            (
                GOOD.replace("exclusive: yes", "exclusive: maybe"),
                "reg.yaml: field `namespaces.users[0].exclusive` must be true or false, found a string",
            ),
            (
                GOOD.replace("      exclusive: yes\n", ""),
                "reg.yaml: missing required field `namespaces.users[0].exclusive`",
            ),
            (
                GOOD.replace("'@telegram_.*:example.org'", "'(unclosed'"),
                "reg.yaml: field `namespaces.users[0].regex` is not a supported regular expression",
            ),
            (
                GOOD.replace("rooms: []", "rooms: 3"),
                "reg.yaml: field `namespaces.rooms` must be a list, found a number",
            ),
            (
                "- just\n- a list\n".to_owned(),
                "reg.yaml: a registration must be a YAML mapping of fields, found a list",
            ),
            (
                GOOD.replace(
                    "sender_localpart: telegrambot",
                    "sender_localpart: Tele Bot",
                ),
                "reg.yaml: field `sender_localpart` must be a non-empty user localpart",
            ),
            (
                format!("{GOOD}receive_ephemeral: 1\n"),
                "reg.yaml: field `receive_ephemeral` must be true or false, found a number",
            ),
        ];
        for (text, expected) in cases {
            let err = parse_str(&text).unwrap_err().to_string();
            assert!(
                err.starts_with(expected),
                "expected {expected:?}, got {err:?}"
            );
        }
    }

    /// Two files with the same id or the same as_token are refused, naming both files.
    #[test]
    fn duplicate_id_or_as_token_is_refused() {
        let dir = std::env::temp_dir().join(format!("asched-reg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.yaml"), GOOD).unwrap();
        std::fs::write(
            dir.join("b.yaml"),
            GOOD.replace("as_token: a1", "as_token: a2"),
        )
        .unwrap();
        let err = load(&[dir.clone()]).unwrap_err().to_string();
        assert!(
            err.ends_with(&format!(
                "b.yaml: field `id` \"telegram\" is already used by {}",
                dir.join("a.yaml").display()
            )),
            "{err}"
        );
        std::fs::write(
            dir.join("b.yaml"),
            GOOD.replace("id: telegram", "id: other"),
        )
        .unwrap();
        let err = load(&[dir.clone()]).unwrap_err().to_string();
        assert!(
            err.contains("b.yaml: field `as_token` is already used by"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
