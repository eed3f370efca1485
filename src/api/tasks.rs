//! `GET /v1/tasks/{id}`: an async task as its client sees it.

use axum::Extension;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::app::AppState;
use crate::auth::AuthenticatedClient;
use crate::error::ApiError;
use crate::tasks::{POLL_HINT, TaskView};

pub async fn get_task(
    State(state): State<AppState>,
    Extension(client): Extension<AuthenticatedClient>,
    id: Result<Path<String>, PathRejection>,
) -> Response {
    // An id that is not UTF-8 once percent-decoded names no task: the same 404 as any other.
    let Ok(Path(id)) = id else {
        return ApiError::task_not_found().into_response();
    };
    // Polls have their own light limit and cost no request or image units.
    if let Err(e) = state.limits.check_poll(&client.id) {
        let headers = e.headers().cloned();
        let mut response = ApiError::from(e).into_response();
        if let Some(headers) = headers {
            headers.apply(response.headers_mut());
        }
        return response;
    }
    match state.tasks.view(client.id.as_str(), &id).await {
        Ok(Some(view)) => task_response(StatusCode::OK, &view),
        Ok(None) => ApiError::task_not_found().into_response(),
        Err(e) => {
            tracing::error!(error = %e, "task lookup failed");
            ApiError::unavailable(
                "task_storage_unavailable",
                "Async tasks cannot be read right now; retry shortly.",
            )
            .with_retry_after(POLL_HINT)
            .into_response()
        }
    }
}

/// A task body with its headers: JSON, and the polling hint while it is pending.
pub fn task_response(status: StatusCode, view: &TaskView) -> Response {
    let mut response = (status, view.body.clone()).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if view.is_pending() {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(POLL_HINT.as_secs()));
    }
    response
}
