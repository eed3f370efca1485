//! The `/admin/` dashboard in headless Chromium, as ops use it: sign in through the form, see
//! every one of 50 configured clients with its quota figures, the key states and the usage
//! chart; a screenshot is written to `target/tmp/dashboard.png`. Any script error, console
//! error or CSP violation on the page fails the test.

use std::collections::BTreeMap;

use imagegate::auth::key_digest_hex;
use imagegate::config::{ClientConfig, UpstreamConfig, UpstreamKeyConfig};
use imagegate::mock_upstream::{Fault, MockOptions};
use serde_json::{Value, json};

use crate::browser::{Browser, chromium_or_skip};
use crate::helpers::{MODEL, UPSTREAM_KEY_2_VAR, UPSTREAM_KEY_3_VAR, random_hex, spawn_app_with};

const CLIENTS: usize = 50;

/// `fmtInt` of the page: digits grouped by commas, whatever the browser's locale.
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Resolves with the page's state once it is no longer `loading`.
const SETTLED: &str = r#"new Promise((resolve) => {
  const state = () => document.body.dataset.state;
  if (state() !== "loading") return resolve(state());
  new MutationObserver((_, observer) => {
    if (state() !== "loading") { observer.disconnect(); resolve(state()); }
  }).observe(document.body, { attributes: true, attributeFilter: ["data-state"] });
})"#;

/// What the page rendered, read back from the DOM.
const RENDERED: &str = r##"(() => {
  const cell = (tr, w) => {
    const td = tr.querySelector(`td[data-window="${w}"]`);
    return { used: td.dataset.used ?? null, limit: td.dataset.limit ?? null,
             text: td.textContent.trim() };
  };
  return {
    clients: [...document.querySelectorAll("#clients tbody tr")].map((tr) => ({
      client: tr.dataset.client, day: cell(tr, "day"), month: cell(tr, "month"),
      budget: cell(tr, "budget") })),
    keys: [...document.querySelectorAll("#upstreams tr[data-key]")].map((tr) => ({
      upstream: tr.closest("table").dataset.upstream, key: tr.dataset.key,
      state: tr.dataset.state, text: tr.textContent })),
    cards: Object.fromEntries([...document.querySelectorAll(".card")].map((c) =>
      [c.querySelector(".label").textContent, c.querySelector(".value").textContent])),
    bars: document.querySelectorAll("#chart rect").length,
    href: location.href,
    text: document.body.innerText,
    stored: sessionStorage.getItem("imagegate.adminToken"),
  };
})()"##;

fn sign_in(token: &str) -> String {
    format!(
        r#"(() => {{
  const input = document.getElementById("token");
  input.value = {token};
  document.getElementById("login").requestSubmit();
  return document.body.dataset.state;
}})()"#,
        token = json!(token)
    )
}

// Multi-threaded: the browser is driven with blocking calls from the test's own thread while
// the gateway serves it from the runtime's workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_every_client_with_its_quota_figures_in_headless_chromium() {
    let Some(chromium) =
        chromium_or_skip("the_dashboard_shows_every_client_with_its_quota_figures")
    else {
        return;
    };

    // 50 clients; a few with tight limits and real usage, so bars cross 80 % and 100 %.
    let tight: Vec<(String, String)> = ["client-03", "client-04", "client-05", "client-06"]
        .iter()
        .map(|id| ((*id).to_owned(), format!("sk-{id}-{}", random_hex(12))))
        .collect();
    let tight_config = tight.clone();
    let app = spawn_app_with(MockOptions::default(), move |c| {
        c.models[0].price_per_image = BTreeMap::from([("standard".to_owned(), 0.02)]);
        // A second key on `primary` the provider refuses, and a `backup` upstream (only
        // behind `other-model`) whose key gets rate limited.
        let mut k2 = UpstreamKeyConfig::from_env("k2", UPSTREAM_KEY_2_VAR);
        k2.requests_per_minute = 10_000;
        k2.max_concurrent = 1_000;
        c.upstreams[0].keys.push(k2);
        let mut backup = UpstreamConfig::new("backup", &c.upstreams[0].base_url.clone());
        backup.timeout_secs = 10;
        backup
            .keys
            .push(UpstreamKeyConfig::from_env("b1", UPSTREAM_KEY_3_VAR));
        c.upstreams.push(backup);
        c.models[1].upstreams = vec!["backup".to_owned()];
        for i in 3..=CLIENTS {
            let id = format!("client-{i:02}");
            let key = tight_config.iter().find(|(t, _)| *t == id).map_or_else(
                || format!("sk-unused-{}", random_hex(8)),
                |(_, k)| k.clone(),
            );
            let mut client = ClientConfig::new(&id, &key_digest_hex(&key));
            match i {
                3 => client.images_per_day = Some(10),
                4 => client.images_per_day = Some(8),
                5 => client.images_per_month = Some(20),
                6 => client.budget_per_month = Some(0.2),
                _ => {}
            }
            c.clients.push(client);
        }
    })
    .await;
    app.mock.set_key_fault(
        &app.upstream_key_2,
        Some("status=401".parse::<Fault>().unwrap()),
    );
    app.mock.set_key_fault(
        &app.upstream_key_3,
        Some("status=429 retry_after=600".parse::<Fault>().unwrap()),
    );

    // Traffic: team-a (one request meets k2, which is disabled, and moves to k1), a failure,
    // a cache hit, team-b, and the tight clients up to 90 %, 100 %, 80 % and 90 % (budget).
    let generate = |key: String, prompt: String, n: u32| {
        let app = &app;
        async move {
            app.generate_as(&key, &json!({"model": MODEL, "prompt": prompt, "n": n}))
                .await
                .status()
        }
    };
    for i in 0..3 {
        assert_eq!(
            generate(app.client_key.clone(), format!("a {i}"), 1).await,
            200
        );
    }
    assert_eq!(
        generate(app.client_key.clone(), "a 0".to_owned(), 1).await,
        200
    );
    assert_eq!(
        generate(app.client_key.clone(), "[mock:status=500] a".to_owned(), 1).await,
        502
    );
    assert_eq!(
        generate(app.other_client_key.clone(), "b".to_owned(), 2).await,
        200
    );
    let plan = [
        (0, [3, 3, 3]),
        (1, [4, 4, 0]),
        (2, [4, 4, 4]),
        (3, [3, 3, 3]),
    ];
    for (t, batches) in plan {
        for (i, n) in batches.into_iter().enumerate().filter(|(_, n)| *n > 0) {
            let (_, key) = &tight[t];
            assert_eq!(generate(key.clone(), format!("t{t} {i}"), n).await, 200);
        }
    }
    assert_eq!(
        generate(tight[2].1.clone(), "t2 last".to_owned(), 4).await,
        200
    );
    let backup = app
        .generate(&json!({"model": "other-model", "prompt": "to the backup"}))
        .await;
    assert_eq!(backup.status(), 503, "b1 is cooling down");
    let usage = app.admin_json("/admin/usage?days=14").await;

    let mut browser = Browser::launch(&chromium);
    let page = browser.open_page(1440, 900);
    browser.navigate(&page, &app.admin_url("/admin/"));
    assert_eq!(browser.evaluate(&page, SETTLED), "login");

    // A wrong token comes back to the form with a message, and is not kept.
    assert_eq!(
        browser.evaluate(&page, &sign_in("not-the-token")),
        "loading"
    );
    assert_eq!(browser.evaluate(&page, SETTLED), "login");
    let refused = browser.evaluate(&page, RENDERED);
    assert!(refused["text"].as_str().unwrap().contains("refused"));
    assert!(refused["stored"].is_null());
    // The browser logs those refused fetches; nothing else may have gone wrong.
    for error in browser.page_errors() {
        assert!(error.to_string().contains("401 (Unauthorized)"), "{error}");
    }
    browser.events.clear();

    browser.evaluate(&page, &sign_in(&app.admin_token));
    assert_eq!(browser.evaluate(&page, SETTLED), "ready");
    let dom = browser.evaluate(&page, RENDERED);

    // The token is kept for the tab and sent as a header, never in the URL or on screen.
    assert_eq!(dom["stored"], app.admin_token.as_str());
    assert!(!dom["href"].as_str().unwrap().contains(&app.admin_token));
    assert!(!dom["text"].as_str().unwrap().contains(&app.admin_token));

    // Every configured client, with its day and month figures as /admin/usage reports them.
    let rows = dom["clients"].as_array().unwrap();
    assert_eq!(rows.len(), CLIENTS);
    for expected in usage["clients"].as_array().unwrap() {
        let id = expected["client"].as_str().unwrap();
        let row = rows
            .iter()
            .find(|r| r["client"] == id)
            .unwrap_or_else(|| panic!("{id} is not on the dashboard"));
        for window in ["day", "month"] {
            let w = &expected[window];
            let used = w["used"].as_u64().unwrap() + w["reserved"].as_u64().unwrap();
            let limit = w["limit"].as_u64().unwrap();
            let cell = &row[window];
            assert_eq!(cell["used"], used.to_string(), "{id} {window}");
            assert_eq!(cell["limit"], limit.to_string(), "{id} {window}");
            let figure = format!("{} / {}", grouped(used), grouped(limit));
            assert!(
                cell["text"].as_str().unwrap().contains(&figure),
                "{id} {window}: `{}` lacks `{figure}`",
                cell["text"]
            );
        }
    }
    let row = |id: &str| rows.iter().find(|r| r["client"] == id).unwrap();
    assert!(
        row("client-03")["day"]["text"]
            .as_str()
            .unwrap()
            .contains("9 / 10")
    );
    assert!(
        row("client-04")["day"]["text"]
            .as_str()
            .unwrap()
            .contains("8 / 8")
    );
    assert!(
        row("client-05")["month"]["text"]
            .as_str()
            .unwrap()
            .contains("16 / 20")
    );
    assert!(
        row("client-06")["budget"]["text"]
            .as_str()
            .unwrap()
            .contains("0.18 / 0.20")
    );
    assert!(
        row("team-a")["day"]["text"]
            .as_str()
            .unwrap()
            .contains("3 / 1,000,000")
    );
    assert_eq!(
        rows[0]["client"], "client-04",
        "the fullest quota comes first"
    );
    assert_eq!(dom["cards"]["clients ≥ 80 % / 100 %"], "3 / 1");

    // Key states, per upstream.
    let keys = dom["keys"].as_array().unwrap();
    let state = |key: &str| {
        keys.iter()
            .find(|k| k["key"] == key)
            .unwrap_or_else(|| panic!("key {key} not shown"))["state"]
            .clone()
    };
    assert_eq!(state("k1"), "healthy");
    assert_eq!(state("k2"), "disabled");
    assert_eq!(state("b1"), "cooling_down");
    assert_eq!(dom["cards"]["keys healthy"], "1 / 3");
    // The chart: a generated and a cached bar for each of the 14 days.
    assert_eq!(dom["bars"], 28);

    let png = browser.screenshot(&page);
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 20_000);
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    std::fs::write(&path, &png).unwrap();
    println!("dashboard screenshot: {}", path.display());

    let errors = browser.page_errors();
    assert!(errors.is_empty(), "the page reported errors: {errors:#?}");

    // Signing out forgets the token.
    browser.evaluate(&page, r#"document.getElementById("signout").click()"#);
    let after = browser.evaluate(&page, RENDERED);
    assert!(after["stored"].is_null());

    // The harness does catch a script error (so a clean run above means something).
    browser.navigate(
        &page,
        "data:text/html,<script>throw new Error('probe')</script>",
    );
    let errors: Vec<Value> = browser.page_errors();
    assert!(
        errors.iter().any(|e| e.to_string().contains("probe")),
        "a thrown error is seen: {errors:#?}"
    );
}
