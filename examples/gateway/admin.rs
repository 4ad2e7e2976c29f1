//! The admin API under `/admin/`, with its own keys and roles.

use hyper::body::Incoming;
use hyper::{Request, StatusCode};

use crate::app::App;
use crate::http::{error, Reply};

/// What an admin key may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Everything.
    Admin,
    /// Workspace settings, limits, budgets, grants.
    Editor,
    /// Read only.
    Viewer,
}

/// Admin keys by the SHA-256 of their secret.
#[derive(Default)]
pub struct AdminKeys {
    pub keys: Vec<(String, [u8; 32], Role)>,
}

pub async fn handle(_app: &App, _request: Request<Incoming>) -> Reply {
    error(StatusCode::NOT_FOUND, "not_found", "no such admin route")
}
