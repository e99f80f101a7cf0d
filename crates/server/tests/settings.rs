//! Every setting is described in five places a user reads: `fanout serve --help` (with its
//! `FANOUT_*` variable), the TOML file, the README's configuration table, and the Helm
//! chart's rendered `fanout.toml` and values schema. This test fails when they disagree:
//! a flag without a README row or TOML key, a README default that is not the one `--help`
//! states, a TOML key the chart can never set.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code: a failed assumption should fail loudly")]

use std::{collections::BTreeSet, path::Path};

use clap::{Args as _, Command};
use fanout_server::config::{ServeArgs, Settings};

fn repo(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(path)).unwrap()
}

/// (long flag, env var, default as `--help` shows it) of every `fanout serve` setting.
fn flags() -> Vec<(String, String, Option<String>)> {
    let cmd = ServeArgs::augment_args(Command::new("serve"));
    cmd.get_arguments()
        .filter_map(|a| {
            let long = a.get_long()?.to_owned();
            let env = a.get_env()?.to_string_lossy().into_owned();
            let default = a.get_default_values().first().map(|d| d.to_string_lossy().into_owned());
            Some((long, env, default))
        })
        .collect()
}

/// The README's rows: (flag, TOML key, default as written).
fn readme_rows() -> Vec<(String, String, String)> {
    repo("README.md")
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            // | `--flag` / `key` | default | meaning |
            let (flag, key) = cells.get(1)?.split_once(" / ")?;
            let flag = flag.trim_matches('`').strip_prefix("--")?.to_owned();
            let key = key.trim_matches('`').to_owned();
            let default = cells.get(2)?.trim_matches('`').to_owned();
            Some((flag, key, default))
        })
        .collect()
}

/// Whether the TOML file accepts `key` (a wrong value type is fine: the key is known).
fn toml_knows(key: &str) -> bool {
    match toml::from_str::<Settings>(&format!("{key} = 0")) {
        Ok(_) => true,
        Err(e) => !e.to_string().contains("unknown field"),
    }
}

#[test]
fn help_readme_and_toml_name_the_same_settings() {
    let flags = flags();
    let rows = readme_rows();
    assert!(flags.len() > 25 && rows.len() > 25, "parsed {} flags and {} README rows", flags.len(), rows.len());
    for (long, env, default) in &flags {
        let key = long.replace('-', "_");
        assert_eq!(env, &format!("FANOUT_{}", key.to_uppercase()), "--{long}: environment variable");
        if long == "config" {
            continue; // names the file itself
        }
        assert!(toml_knows(&key), "--{long} has no TOML key {key}");
        let row = rows.iter().find(|(f, _, _)| f == long).unwrap_or_else(|| panic!("README has no row for --{long}"));
        assert_eq!(row.1, key, "README row for --{long} names another TOML key");
        if let Some(default) = default {
            assert_eq!(&row.2, default, "--{long}: README default {:?}, --help default {default:?}", row.2);
        }
    }
    for (flag, _, _) in &rows {
        assert!(
            flags.iter().any(|(l, _, _)| l == flag),
            "README documents --{flag}, which `fanout serve` does not have"
        );
    }
}

#[test]
fn the_chart_can_set_every_toml_setting() {
    let rendered: BTreeSet<String> = repo("helm/fanout/templates/_config.tpl")
        .lines()
        .filter_map(|l| l.split_once(" = ").map(|(k, _)| k.trim().to_owned()))
        .filter(|k| k.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        .collect();
    // Credentials reach the node as FANOUT_* variables from the chart's Secret; the
    // password and secrets never sit in the rendered file.
    let from_secret = ["redis_password", "api_key", "jwt_hmac_secret"];
    for (long, _, _) in flags() {
        let key = long.replace('-', "_");
        if long == "config" || from_secret.contains(&key.as_str()) {
            continue;
        }
        assert!(rendered.contains(&key), "the chart's fanout.toml never sets {key}");
    }
    // Every config.* value the chart reads is in its schema (which refuses unknown keys).
    let schema: serde_json::Value = serde_json::from_str(&repo("helm/fanout/values.schema.json")).unwrap();
    let props = &schema["properties"]["config"]["properties"];
    let template = repo("helm/fanout/templates/_config.tpl");
    for used in template.split("$c.").skip(1).filter_map(|s| s.split(|c: char| !c.is_ascii_alphanumeric()).next()) {
        assert!(props.get(used).is_some(), "config.{used} is rendered but not in values.schema.json");
    }
}
