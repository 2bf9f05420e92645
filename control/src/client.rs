//! The client side (the `espada show` CLI).

use crate::{Request, Response};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Sends one request to the gateway listening on `socket` and returns its response.
pub fn request(socket: &Path, req: &Request) -> Result<Response, String> {
    let mut s = UnixStream::connect(socket).map_err(|e| {
        format!(
            "cannot reach a gateway on {}: {e} (is `espada run` running, and is this its --control socket?)",
            socket.display()
        )
    })?;
    let t = Some(Duration::from_secs(5));
    let _ = s.set_read_timeout(t);
    let _ = s.set_write_timeout(t);
    let mut line = serde_json::to_string(req).map_err(|e| e.to_string())?;
    line.push('\n');
    s.write_all(line.as_bytes())
        .map_err(|e| format!("{}: {e}", socket.display()))?;
    let mut answer = String::new();
    BufReader::new(&s)
        .read_line(&mut answer)
        .map_err(|e| format!("{}: {e}", socket.display()))?;
    serde_json::from_str(&answer)
        .map_err(|e| format!("{}: not an espada answer ({e})", socket.display()))
}
