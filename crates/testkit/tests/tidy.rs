//! Tidy checks over the whole workspace, the invariants docs/ARCHITECTURE.md states about
//! its layout: every source file says what it owns in a `//!` line, and crates depend on
//! each other (and on hyper, fastwebsockets and redis) only in the stated directions.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code: a failed assumption should fail loudly")]

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if path.is_dir() {
            if name != "target" && name != "node_modules" && !name.to_string_lossy().starts_with('.') {
                rust_files(&path, out);
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_source_file_opens_with_what_it_owns() {
    let root = root();
    let mut files = Vec::new();
    for dir in ["crates", "loadtest", "fuzz"] {
        rust_files(&root.join(dir), &mut files);
    }
    assert!(files.len() > 50, "found only {} files under {}", files.len(), root.display());
    let missing: Vec<String> = files
        .iter()
        .filter(|f| !std::fs::read_to_string(f).unwrap_or_default().starts_with("//!"))
        .map(|f| f.strip_prefix(&root).unwrap_or(f).display().to_string())
        .collect();
    assert!(missing.is_empty(), "these files do not open with a //! line saying what they own: {missing:#?}");
}

/// Normal (non-dev) dependencies of each workspace package, as `cargo metadata` reports.
fn dependencies() -> BTreeMap<String, BTreeSet<String>> {
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--no-deps", "--offline"])
        .current_dir(root())
        .output()
        .expect("cargo metadata");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut deps = BTreeMap::new();
    for p in meta["packages"].as_array().unwrap() {
        let names = p["dependencies"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["kind"].is_null())
            .map(|d| d["name"].as_str().unwrap().to_owned())
            .collect();
        deps.insert(p["name"].as_str().unwrap().to_owned(), names);
    }
    deps
}

#[test]
fn crates_depend_only_in_the_documented_directions() {
    let deps = dependencies();
    // docs/ARCHITECTURE.md: protocol ← hub ← broker-redis ← server; publisher and loadtest
    // on protocol (loadtest also on publisher); the server's CLI uses the publisher.
    let allowed: [(&str, &[&str]); 7] = [
        ("fanout-protocol", &[]),
        ("fanout-hub", &["fanout-protocol"]),
        ("fanout-broker-redis", &["fanout-protocol", "fanout-hub"]),
        ("fanout-server", &["fanout-protocol", "fanout-hub", "fanout-broker-redis", "fanout-publisher"]),
        ("fanout-publisher", &["fanout-protocol"]),
        ("fanout-testkit", &["fanout-protocol"]),
        ("fanout-loadtest", &["fanout-protocol", "fanout-publisher"]),
    ];
    for (krate, may) in allowed {
        let got: BTreeSet<&str> = deps[krate].iter().map(String::as_str).filter(|d| d.starts_with("fanout-")).collect();
        let may: BTreeSet<&str> = may.iter().copied().collect();
        assert!(got.is_subset(&may), "{krate} depends on {:?}, beyond what ARCHITECTURE.md allows", &got - &may);
    }
    // Who may know which outside crate.
    let only: [(&str, &[&str]); 3] = [
        ("fastwebsockets", &["fanout-server"]),
        ("hyper", &["fanout-server", "fanout-publisher"]),
        ("redis", &["fanout-broker-redis", "fanout-publisher", "fanout-testkit"]),
    ];
    for (dep, users) in only {
        for (krate, names) in &deps {
            assert!(
                !names.contains(dep) || users.contains(&krate.as_str()),
                "{krate} depends on {dep}; ARCHITECTURE.md keeps it to {users:?}"
            );
        }
    }
    // `protocol` does no I/O and knows no runtime.
    for io in ["tokio", "hyper", "redis", "futures-util"] {
        assert!(!deps["fanout-protocol"].contains(io), "fanout-protocol depends on {io}");
    }
}
