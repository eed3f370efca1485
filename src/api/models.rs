//! `GET /v1/models`: the models this client may use.

use axum::Extension;
use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use serde::Serialize;

use crate::app::AppState;
use crate::auth::AuthenticatedClient;
use crate::error::ApiError;

#[derive(Serialize)]
pub struct ModelList {
    object: &'static str,
    data: Vec<ModelObject>,
}

#[derive(Serialize)]
pub struct ModelObject {
    id: String,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
}

/// `GET /v1/models/{id}`: one model, if this client may use it.
pub async fn get_model(
    State(state): State<AppState>,
    Extension(client): Extension<AuthenticatedClient>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<ModelObject>, ApiError> {
    // An id that is not UTF-8 once percent-decoded names no model: the same 404.
    let Ok(Path(id)) = id else {
        return Err(ApiError::model_not_found("(not UTF-8)"));
    };
    let runtime = state.runtime();
    match runtime.models.get(&id) {
        Some(model) if client.may_use(model.name()) => Ok(Json(ModelObject {
            id: model.name().to_owned(),
            object: "model",
            created: state.started_at,
            owned_by: "imagegate",
        })),
        _ => Err(ApiError::model_not_found(&id)),
    }
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
