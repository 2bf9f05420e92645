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
//! `policy`; `reload` (re-read the configuration, as SIGHUP does; the answer says what
//! happened); `clear` (zero the workers' counters and drops); `monitor` (the connection
//! becomes a stream of events, see [`monitor`]); `sa` with `what` = `add` | `del` | `update` | `rekey` and `args` (see
//! [`supervisor`]); and `version`.
//!
//! ```text
//! → {"cmd":"sa","what":"rekey","args":{"tunnel":"west-east"}}
//! → {"cmd":"sa","what":"del","args":{"tunnel":"west-east"}}
//! → {"cmd":"sa","what":"add","args":{"tunnel":"west-east"}}
//! → {"cmd":"sa","what":"add","args":{"tunnel":"west-east","dir":"in","spi":8193,"cpu":0,"key":"<hex>"}}
//! → {"cmd":"sa","what":"update","args":{"spi":4097,"hard_seconds":7200}}
//! → {"cmd":"sa","what":"batch","args":{"ops":[{"what":"add","args":{...}},{"what":"del","args":{...}}]}}
//! ```
//!
//! A batch (at most [`supervisor::MAX_BATCH`] changes, 4 MiB a request) is published as one
//! snapshot, all or nothing.
//!
//! Keys travel only over this socket (mode 0600) and are never logged or echoed. The data a worker publishes is read from its [`StatsCell`]: the
//! counters every 16th poll, the SA and port counters every 256th, so a reply is at most a few
//! milliseconds old and no worker ever waits for the control plane.
//!
//! [`StatsCell`]: espada_dataplane::worker::StatsCell
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod client;
pub mod conn;
pub mod metrics;
pub mod monitor;
pub mod server;
pub mod supervisor;

use serde::{Deserialize, Serialize};

/// One request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// `show` or `version`.
    pub cmd: String,
    /// What to show, or the `sa` subcommand (`add`, `del`, `update`, `rekey`).
    #[serde(default)]
    pub what: String,
    /// Arguments of an `sa` command (an object: `tunnel`, `spi`, `dir`, `cpu`, `key`, `port`,
    /// `soft_seconds`, ...).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub args: serde_json::Value,
}

impl Request {
    /// A request without arguments.
    pub fn new(cmd: &str, what: &str) -> Request {
        Request {
            cmd: cmd.into(),
            what: what.into(),
            args: serde_json::Value::Null,
        }
    }
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
