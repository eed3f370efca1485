//! `GET /v1/models`: the models this client may use.

use axum::Extension;
use axum::Json;
use axum::extract::State;
use serde::Serialize;

use crate::app::AppState;
use crate::auth::AuthenticatedClient;

#[derive(Serialize)]
pub struct ModelList {
    object: &'static str,
    data: Vec<ModelObject>,
}

#[derive(Serialize)]
struct ModelObject {
    id: String,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
}

pub async fn list_models(
    State(state): State<AppState>,
    Extension(client): Extension<AuthenticatedClient>,
) -> Json<ModelList> {
    let runtime = state.runtime();
    let data = runtime
        .models
        .iter()
        .filter(|m| client.may_use(m.name()))
        .map(|m| ModelObject {
            id: m.name().to_owned(),
            object: "model",
            created: state.started_at,
            owned_by: "imagegate",
        })
        .collect();
    Json(ModelList {
        object: "list",
        data,
    })
}
