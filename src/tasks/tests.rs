use std::collections::HashSet;

use super::*;
use crate::storage::Database;

fn record(id: &TaskId, client: &str, key: Option<&str>) -> TaskRecord {
    TaskRecord {
        id: id.clone(),
        client: client.to_owned(),
        state: TaskState::Queued,
        mode: crate::config::TaskMode::Gateway,
        request: r#"{"model":"m","prompt":"p"}"#.to_owned(),
        cache_read: true,
        cache_store: false,
        idempotency_key: key.map(str::to_owned),
        request_hash: [7; 32],
        attempts: 0,
        native: None,
        images: None,
        result: None,
        error: None,
        created_at: 1_000,
        started_at: None,
        finished_at: None,
        expires_at: None,
    }
}

#[test]
fn task_ids_carry_128_random_bits_and_only_their_own_form_parses() {
    let ids: Vec<TaskId> = (0..2_000).map(|_| TaskId::generate()).collect();
    let distinct: HashSet<&str> = ids.iter().map(TaskId::as_str).collect();
    assert_eq!(distinct.len(), ids.len());
    // Every one of the 128 bits takes both values across the sample: none is fixed.
    let (mut any_one, mut any_zero) = (0u128, 0u128);
    for id in &ids {
        assert!(TaskId::parse(id.as_str()).is_some(), "{id}");
        let bits = u128::from_str_radix(&id.as_str()["task_".len()..], 16).unwrap();
        any_one |= bits;
        any_zero |= !bits;
    }
    assert_eq!((any_one, any_zero), (u128::MAX, u128::MAX));
    for bad in [
        "",
        "task_",
        "task_123",
        "TASK_00000000000000000000000000000000",
        "task_0000000000000000000000000000000G",
        "task_000000000000000000000000000000000",
        "../task_00000000000000000000000000000000",
    ] {
        assert!(TaskId::parse(bad).is_none(), "{bad}");
    }
}

#[test]
fn a_completed_body_is_the_task_head_with_the_result_spliced_in() {
    let id = TaskId::generate();
    let mut r = record(&id, "team", None);
    r.state = TaskState::Completed;
    r.result = Some(Bytes::from_static(
        br#" {"created":1700000000,"data":[{"url":"http://x/1.png","revised_prompt":"p"}]} "#,
    ));
    r.finished_at = Some(1_010);
    r.expires_at = Some(2_010);
    let body: serde_json::Value = serde_json::from_slice(&render(&r, 100)).unwrap();
    assert_eq!(body["id"], id.as_str());
    assert_eq!(body["object"], "image.task");
    assert_eq!(body["status"], "completed");
    assert_eq!(body["progress"], 100);
    assert_eq!(body["created_at"], 1_000);
    assert_eq!(body["expires_at"], 2_010);
    assert_eq!(body["created"], 1_700_000_000);
    assert_eq!(body["data"][0]["url"], "http://x/1.png");
}

#[test]
fn pending_and_failed_bodies_have_their_own_fields_only() {
    let id = TaskId::generate();
    let r = record(&id, "team", None);
    let body: serde_json::Value = serde_json::from_slice(&render(&r, 0)).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"id": id.as_str(), "object": "image.task", "status": "queued",
            "progress": 0, "created_at": 1_000})
    );
    let mut failed = r.clone();
    failed.state = TaskState::Failed;
    failed.error =
        Some(serde_json::to_string(&ApiError::internal_task_interrupted().body()).unwrap());
    failed.finished_at = Some(1_001);
    failed.expires_at = Some(1_002);
    let body: serde_json::Value = serde_json::from_slice(&render(&failed, 100)).unwrap();
    assert_eq!(body["status"], "failed");
    assert_eq!(body["error"]["code"], "task_interrupted");
    assert_eq!(body["error"]["type"], "server_error");
    assert!(body["error"]["param"].is_null());
    assert!(body.get("data").is_none());
}

#[test]
fn result_fields_that_would_collide_with_the_task_fields_are_dropped() {
    let plain = Bytes::from_static(br#"{"created":1,"data":[]}"#);
    assert_eq!(
        without_task_fields(&plain).as_ptr(),
        plain.as_ptr(),
        "an ordinary ImagesResponse is kept as it came"
    );
    let colliding = Bytes::from_static(br#"{"id":"up_1","status":"done","created":1,"data":[]}"#);
    let cleaned: serde_json::Value =
        serde_json::from_slice(&without_task_fields(&colliding)).unwrap();
    assert_eq!(cleaned, serde_json::json!({"created": 1, "data": []}));
}

async fn exercise_store(store: &dyn TaskStore) {
    let a = TaskId::generate();
    let b = TaskId::generate();
    assert!(matches!(
        store
            .insert(record(&a, "team", Some("key-1")))
            .await
            .unwrap(),
        Inserted::Created
    ));
    // The same client and key name the first task; another client may reuse the key.
    match store
        .insert(record(&b, "team", Some("key-1")))
        .await
        .unwrap()
    {
        Inserted::Existing(existing) => assert_eq!(existing.id, a),
        Inserted::Created => panic!("an idempotency key names one task per client"),
    }
    assert!(matches!(
        store
            .insert(record(&b, "other", Some("key-1")))
            .await
            .unwrap(),
        Inserted::Created
    ));
    assert_eq!(
        store
            .find_idempotent("team", "key-1")
            .await
            .unwrap()
            .unwrap()
            .id,
        a
    );
    assert!(
        store
            .find_idempotent("team", "key-2")
            .await
            .unwrap()
            .is_none()
    );

    assert_eq!(store.start(&a, 1_001).await.unwrap(), 1);
    assert_eq!(store.start(&a, 1_002).await.unwrap(), 2, "a restart counts");
    let native = NativeRef {
        upstream: "primary".into(),
        key_id: "k1".into(),
        upstream_task_id: "up-1".into(),
    };
    store.set_native(&a, &native).await.unwrap();
    let got = store.get(a.as_str()).await.unwrap().unwrap();
    assert_eq!(
        (got.state, got.attempts, got.started_at),
        (TaskState::Processing, 2, Some(1_002))
    );
    assert_eq!(got.native, Some(native));
    assert_eq!(got.request_hash, [7; 32]);
    assert!(got.cache_read && !got.cache_store);

    let pending: Vec<TaskId> = store
        .pending()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(pending.len(), 2);

    let body = Bytes::from_static(br#"{"created":1,"data":[{"b64_json":"AAAA"}]}"#);
    store
        .finish(
            &a,
            Finish::Completed {
                body: body.clone(),
                images: 1,
            },
            1_010,
            1_110,
        )
        .await
        .unwrap();
    store
        .finish(
            &b,
            Finish::Failed {
                error: r#"{"message":"m","type":"server_error","param":null,"code":null}"#.into(),
            },
            1_020,
            1_120,
        )
        .await
        .unwrap();
    let done = store.get(a.as_str()).await.unwrap().unwrap();
    assert_eq!(done.state, TaskState::Completed);
    assert_eq!(done.result.as_deref(), Some(&body[..]));
    assert_eq!((done.images, done.expires_at), (Some(1), Some(1_110)));
    assert!(store.pending().await.unwrap().is_empty());

    assert_eq!(store.remove_expired(1_109).await.unwrap(), 0);
    assert_eq!(store.remove_expired(1_110).await.unwrap(), 1);
    assert!(
        store.get(a.as_str()).await.unwrap().is_none(),
        "gone with its bytes"
    );
    assert!(store.get(b.as_str()).await.unwrap().is_some());
    assert!(!done.is_live(1_110) && done.is_live(1_109));
}

#[tokio::test]
async fn the_memory_store_keeps_task_rows() {
    exercise_store(&LocalTaskStore::in_memory()).await;
}

#[tokio::test]
async fn the_sqlite_store_keeps_task_rows_across_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("imagegate.db");
    let db = Database::open_async(&path).await.unwrap();
    exercise_store(&LocalTaskStore::sqlite(db.clone())).await;
    let kept = TaskId::generate();
    LocalTaskStore::sqlite(db.clone())
        .insert(record(&kept, "team", None))
        .await
        .unwrap();
    db.writer().close().await;
    drop(db);

    let db = Database::open_async(&path).await.unwrap();
    let store = LocalTaskStore::sqlite(db);
    let pending = store.pending().await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].id, kept);
    assert_eq!(pending[0].request, r#"{"model":"m","prompt":"p"}"#);
}

#[test]
fn a_task_is_served_for_at_least_its_ttl_whatever_the_fraction_of_its_finishing_second() {
    let at = |secs: u64, millis: u64| UNIX_EPOCH + Duration::from_millis(secs * 1_000 + millis);
    // On a whole second, exactly the ttl.
    assert_eq!(expiry(at(1_000, 0), 1), 1_001);
    // Late in a second, rounded up: 1 000.95 + 1 s is gone at 1 002, not at 1 001 (50 ms later).
    assert_eq!(expiry(at(1_000, 950), 1), 1_002);
    assert_eq!(expiry(at(1_000, 1), 600), 1_601);
    assert_eq!(expiry(at(1_000, 1), u64::MAX), i64::MAX);
}
