//! espada-control: see into a running gateway.
//!
//! The gateway serves a Unix socket (mode 0600: root, or whoever runs it) off the fast path, on
//! a thread of its own. The protocol is JSON lines: one request object per line, one response
//! object per line.
//!
//! ```text
//! → {"cmd":"show","what":"sa"}
//! ← {"ok":true,"data":{...}}
//! ← {"ok":false,"error":"unknown command \"shoe\""}
//! ```
//!
//! Commands: `show` with `what` = `sa` | `stats` | `errors` | `workers` | `neighbors` |
//! `policy`; `reload` (re-read the configuration, as SIGHUP does); and `version`. The data a worker publishes is read from its [`StatsCell`]: the
//! counters every 16th poll, the SA and port counters every 256th, so a reply is at most a few
//! milliseconds old and no worker ever waits for the control plane.
//!
//! [`StatsCell`]: espada_dataplane::worker::StatsCell
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod client;
pub mod metrics;
pub mod server;

use serde::{Deserialize, Serialize};

/// One request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// `show` or `version`.
    pub cmd: String,
    /// What to show.
    #[serde(default)]
    pub what: String,
}

/// One response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request was understood and answered.
    pub ok: bool,
    /// What went wrong (when `ok` is false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The answer.
    #[serde(default)]
    pub data: serde_json::Value,
}

/// What `show` can show.
pub const SHOW: &[&str] = &["sa", "stats", "errors", "workers", "neighbors", "policy"];

/// Where a gateway named `name` listens unless told otherwise.
pub fn default_socket(name: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(format!("/run/espada/{name}.sock"))
}
