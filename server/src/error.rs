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
    /// A JSON-RPC call names a method the entity does not have.
    #[error("{0}")]
    NoSuchMethod(String),
    /// The server cannot serve now (not ready: its master is inactive, or the database
    /// does not answer).
    #[error("{0}")]
    Unavailable(String),
    /// Something failed inside; the details go to the log only.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) | ApiError::NoSuchMethod(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UriTooLong(_) => StatusCode::URI_TOO_LONG,
            ApiError::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.log();
        let status = self.status();
        (status, Json(json!({ "error": self.to_string() }))).into_response()
    }
}

impl ApiError {
    /// Logs an internal failure (its details never reach the client).
    fn log(&self) {
        if let ApiError::Internal(detail) = self {
            tracing::error!(error = %detail, "request failed");
        }
    }

    /// The JSON-RPC 2.0 error code: the spec's own where one fits, otherwise one of the
    /// range it leaves to servers (-32000..-32099).
    pub fn rpc_code(&self) -> i64 {
        match self {
            ApiError::BadRequest(_) => -32602,
            ApiError::NoSuchMethod(_) => -32601,
            ApiError::Internal(_) => -32603,
            ApiError::TooLarge(_) | ApiError::UriTooLong(_) | ApiError::HeadersTooLarge(_) => {
                -32600
            }
            ApiError::Unauthorized(_) => -32001,
            ApiError::NotFound(_) => -32004,
            ApiError::Conflict(_) => -32009,
            ApiError::Unavailable(_) => -32003,
        }
    }
}

/// The one mapping from the engine's errors to the API's: what the client asked for is
/// wrong (400), missing (404) or in the way of the entity's state (409); anything else is
/// the server's own failure (500). An unknown builder is a 400 wherever it comes from: a
/// submission names it; a path that names a builder answers 404 on its own.
impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let message = e.to_string();
        match e {
            EngineError::UnknownBuilder(_)
            | EngineError::Invalid(_)
            | EngineError::Storage(StorageError::UnknownBuilder(_) | StorageError::Invalid(_)) => {
                ApiError::BadRequest(message)
            }
            EngineError::Storage(StorageError::NotFound { .. }) => ApiError::NotFound(message),
            EngineError::DuplicateBuilder(_)
            | EngineError::ShuttingDown
            | EngineError::Storage(
                StorageError::AlreadyClaimed(_)
                | StorageError::NotClaimed(_)
                | StorageError::NotOwner { .. }
                | StorageError::ClaimLost { .. },
            ) => ApiError::Conflict(message),
            EngineError::NotReady(_) => ApiError::Unavailable(message),
            EngineError::Internal(_) | EngineError::Storage(_) => ApiError::Internal(message),
        }
    }
}

/// A refused JSON-RPC call: the HTTP status of the error, and a JSON-RPC 2.0 error
/// object carrying the call's id (`null` when the body could not be read).
#[derive(Debug)]
pub struct RpcError {
    /// The call's id.
    pub id: serde_json::Value,
    /// What went wrong.
    pub error: ApiError,
}

impl IntoResponse for RpcError {
    fn into_response(self) -> Response {
        self.error.log();
        let body = crate::json::value(crate::wire::RpcError {
            jsonrpc: "2.0".into(),
            error: crate::wire::RpcErrorDetail {
                code: self.error.rpc_code(),
                message: self.error.to_string(),
            },
            id: self.id,
        });
        (self.error.status(), Json(body)).into_response()
    }
}

/// The result type of handlers.
pub type ApiResult<T> = Result<T, ApiError>;
