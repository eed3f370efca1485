//! The configs shipped in `deploy/` are valid imagegate configs whose secrets all resolve from
//! the env vars the compose file and the Kubernetes Deployment provide.

use std::path::Path;

use imagegate::config::{Config, Env};

fn read(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

/// The `imagegate.toml: |` block of the ConfigMap, de-indented.
fn configmap_toml(yaml: &str) -> String {
    let (_, block) = yaml
        .split_once("  imagegate.toml: |\n")
        .expect("the ConfigMap has imagegate.toml");
    block
        .lines()
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
}

fn check(name: &str, text: &str) {
    // Exactly the secrets the deployments provide: PRIMARY_KEY_1 and the admin token.
    let env = Env::from_pairs([
        ("PRIMARY_KEY_1", "sk-placeholder"),
        ("IMAGEGATE_ADMIN_TOKEN", "placeholder-admin-token"),
    ]);
    let config = Config::from_toml(text, &env).unwrap_or_else(|e| panic!("{name}: {e}"));
    let secrets = config
        .resolve_secrets(&env)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(
        secrets.admin_token.is_some(),
        "{name}: the admin token resolves"
    );
    assert_eq!(
        config.server.admin_listen.ip().to_string(),
        "0.0.0.0",
        "{name}: probes and Prometheus reach the admin port"
    );
    assert_eq!(
        config.storage.path,
        Path::new("/var/lib/imagegate/imagegate.db"),
        "{name}: the ledger is on the data volume"
    );
}

#[test]
fn the_compose_and_kubernetes_configs_are_valid() {
    check("deploy/imagegate.toml", &read("deploy/imagegate.toml"));
    let yaml = read("deploy/k8s/configmap.yaml");
    check("deploy/k8s/configmap.yaml", &configmap_toml(&yaml));
}
