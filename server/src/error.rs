//! API errors: a status and a JSON body `{"error": "..."}` that says what was wrong with
//! the request. Internal failures are logged and answered with a generic message, so
//! that no SQL, path or panic reaches a client.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use kiln_engine::EngineError;
use kiln_engine::storage::StorageError;
use serde_json::json;

/// What went wrong with a request.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed: an unknown parameter, field or operator, a bad value.
    #[error("{0}")]
    BadRequest(String),
    /// No such entity or route.
    #[error("{0}")]
    NotFound(String),
    /// A write without the right token (or reads, when they are private).
    #[error("{0}")]
    Unauthorized(String),
    /// The action conflicts with the entity's state (cancel a complete request, ...).
    #[error("{0}")]
    Conflict(String),
    /// The upload is too large.
    #[error("{0}")]
    TooLarge(String),
    /// The request URI is too long.
    #[error("{0}")]
    UriTooLong(String),
    /// The request's headers are too many or too large.
    #[error("{0}")]
    HeadersTooLarge(String),
    /// Something failed inside; the details go to the log only.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UriTooLong(_) => StatusCode::URI_TOO_LONG,
            ApiError::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(detail) = &self {
            tracing::error!(error = %detail, "request failed");
        }
        let status = self.status();
        (status, Json(json!({ "error": self.to_string() }))).into_response()
    }
}

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::NotFound { .. } | StorageError::UnknownBuilder(_) => {
                ApiError::NotFound(e.to_string())
            }
            StorageError::Invalid(_) => ApiError::BadRequest(e.to_string()),
            StorageError::AlreadyClaimed(_)
            | StorageError::NotClaimed(_)
            | StorageError::NotOwner { .. }
            | StorageError::ClaimLost { .. } => ApiError::Conflict(e.to_string()),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Storage(s) => s.into(),
            EngineError::UnknownBuilder(_) => ApiError::BadRequest(e.to_string()),
            EngineError::Invalid(_) => ApiError::BadRequest(e.to_string()),
            EngineError::DuplicateBuilder(_) => ApiError::Conflict(e.to_string()),
            EngineError::ShuttingDown => ApiError::Conflict(e.to_string()),
        }
    }
}

/// The result type of handlers.
pub type ApiResult<T> = Result<T, ApiError>;
