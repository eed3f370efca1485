//! The real binary's CLI: check-config exit codes and messages, keygen.

use std::process::Command;

use imagegate::auth::key_digest_hex;

const BIN: &str = env!("CARGO_BIN_EXE_imagegate");

fn example_config() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/imagegate.example.toml"
    ))
    .unwrap()
}

fn check_config(text: &str, envs: &[(&str, &str)]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("imagegate.toml");
    std::fs::write(&path, text).unwrap();
    let mut command = Command::new(BIN);
    command
        .arg("check-config")
        .arg("--config")
        .arg(&path)
        .env_clear();
    for (k, v) in envs {
        command.env(k, v);
    }
    command.output().unwrap()
}

#[test]
fn check_config_accepts_the_example_when_its_secrets_are_set_and_hides_them() {
    let out = check_config(
        &example_config(),
        &[
            ("PRIMARY_KEY_1", "sk-canary-check-config"),
            ("IMAGEGATE_ADMIN_TOKEN", "sk-admin-x"),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("[set]"));
    assert!(!stdout.contains("sk-canary-check-config"));
    assert!(stdout.contains("listen = \"127.0.0.1:8080\""));
}

#[test]
fn check_config_exits_2_naming_a_missing_secret() {
    let out = check_config(&example_config(), &[]);
    assert_eq!(out.status.code(), Some(2));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("PRIMARY_KEY_1") && stdout.contains("[missing]"),
        "{stdout}"
    );
}

#[test]
fn check_config_exits_2_naming_an_unknown_key() {
    let text = example_config().replace("[server]\n", "[server]\nlisten_port = 8080\n");
    let out = check_config(&text, &[("PRIMARY_KEY_1", "x")]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("server") && stderr.contains("listen_port"),
        "{stderr}"
    );
}

#[test]
fn check_config_applies_env_overrides_and_rejects_bad_ones() {
    let out = check_config(
        &example_config(),
        &[
            ("PRIMARY_KEY_1", "x"),
            ("IMAGEGATE__SERVER__LISTEN", "0.0.0.0:18080"),
        ],
    );
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("0.0.0.0:18080"));

    let out = check_config(
        &example_config(),
        &[
            ("PRIMARY_KEY_1", "x"),
            ("IMAGEGATE__SERVER__LISTEN", "not-an-address"),
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("server.listen"));
}

#[test]
fn serve_exits_2_on_an_invalid_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[server]\nlisten = 5\n").unwrap();
    let out = Command::new(BIN)
        .arg("serve")
        .arg("--config")
        .arg(&path)
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("server.listen"));
}

#[test]
fn keygen_prints_a_key_and_its_digest_line() {
    let out = Command::new(BIN)
        .args(["keygen", "--client", "design-team"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let key = stdout
        .lines()
        .find(|l| l.starts_with("sk-ig-"))
        .expect("a key line");
    assert!(stdout.contains(&format!("key_sha256 = \"{}\"", key_digest_hex(key))));
    assert!(stdout.contains("id = \"design-team\""));
}
