//! The admin API's client for weftctl: HTTP/1.0 over the Unix socket, so an answer ends
//! when the agent closes the connection (no chunked framing to undo), and a `/tap` stream
//! can be read line by line as it arrives.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

/// What can go wrong asking the agent.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the agent at {socket}: {source} (is weft-agent running on this node, and are you root?)")]
    Connect {
        socket: String,
        source: std::io::Error,
    },
    #[error("the agent at {socket} did not answer: {source}")]
    Io {
        socket: String,
        source: std::io::Error,
    },
    #[error("the agent sent something that is not an HTTP answer: {0}")]
    Malformed(String),
}

/// An answer: its status and the reader positioned at the start of its body.
pub struct Answer {
    pub status: u16,
    pub body: BufReader<UnixStream>,
}

impl Answer {
    /// The whole body as JSON.
    pub fn json(mut self) -> Result<serde_json::Value, ClientError> {
        let mut text = String::new();
        self.body
            .read_to_string(&mut text)
            .map_err(|e| ClientError::Malformed(e.to_string()))?;
        serde_json::from_str(&text)
            .map_err(|e| ClientError::Malformed(format!("{e}: {}", text.trim())))
    }

    /// The whole body as text.
    pub fn text(mut self) -> Result<String, ClientError> {
        let mut text = String::new();
        self.body
            .read_to_string(&mut text)
            .map_err(|e| ClientError::Malformed(e.to_string()))?;
        Ok(text)
    }
}

/// `GET path` on the admin socket; `read_timeout` bounds every read (`None` for a tap).
pub fn get(
    socket: &Path,
    path: &str,
    read_timeout: Option<Duration>,
) -> Result<Answer, ClientError> {
    request(socket, "GET", path, None, read_timeout)
}

/// `METHOD path` with an optional JSON body, as JSON (any status: errors are JSON too).
pub fn send_json(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<(u16, serde_json::Value), ClientError> {
    let body = body.map(|b| b.to_string());
    let a = request(
        socket,
        method,
        path,
        body.as_deref(),
        Some(Duration::from_secs(30)),
    )?;
    let status = a.status;
    Ok((status, a.json()?))
}

fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
    read_timeout: Option<Duration>,
) -> Result<Answer, ClientError> {
    let name = socket.display().to_string();
    let mut s = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        socket: name.clone(),
        source,
    })?;
    let io = |source| ClientError::Io {
        socket: name.clone(),
        source,
    };
    s.set_read_timeout(read_timeout).map_err(io)?;
    s.set_write_timeout(Some(Duration::from_secs(10)))
        .map_err(io)?;
    let head = match body {
        Some(b) => format!(
            "{method} {path} HTTP/1.0\r\nHost: weft-agent\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        ),
        None => format!("{method} {path} HTTP/1.0\r\nHost: weft-agent\r\n\r\n"),
    };
    s.write_all(head.as_bytes()).map_err(io)?;
    let mut body = BufReader::new(s);
    let mut line = String::new();
    body.read_line(&mut line).map_err(io)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| ClientError::Malformed(line.trim().to_owned()))?;
    loop {
        line.clear();
        if body.read_line(&mut line).map_err(io)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    Ok(Answer { status, body })
}

/// `GET path` as JSON (any status: errors are JSON too).
pub fn get_json(socket: &Path, path: &str) -> Result<(u16, serde_json::Value), ClientError> {
    let a = get(socket, path, Some(Duration::from_secs(10)))?;
    let status = a.status;
    Ok((status, a.json()?))
}
