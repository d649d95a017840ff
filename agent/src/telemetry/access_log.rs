//! Access logs: one JSON line per HTTP request and per forwarded TCP connection, to stdout
//! or a file. Lines are written by a thread of their own through a bounded queue, so a slow
//! disk or a blocked stdout never slows a request: when the queue is full the record is
//! dropped and counted (`weft_proxy_access_log_dropped_total`).

use std::{
    io::Write as _,
    path::PathBuf,
    sync::{
        mpsc::{sync_channel, Receiver, SyncSender, TrySendError},
        Arc,
    },
};

use super::Record;
use crate::metrics::Metrics;

/// Records waiting to be written; more are dropped.
pub const QUEUE: usize = 8192;

/// Where access log lines go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Stdout,
    /// Appended to; created if missing.
    File(PathBuf),
}

impl std::str::FromStr for Target {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "-" | "stdout" => Self::Stdout,
            path => Self::File(PathBuf::from(path)),
        })
    }
}

/// The access log of one agent.
pub struct AccessLog {
    tx: SyncSender<Arc<Record>>,
    /// The share of successful requests logged (0.0 to 1.0); failed ones always are.
    sample: f64,
    metrics: Arc<Metrics>,
}

impl AccessLog {
    /// Open `target` and start the writer thread.
    pub fn start(target: &Target, sample: f64, metrics: Arc<Metrics>) -> std::io::Result<Self> {
        let out: Box<dyn std::io::Write + Send> = match target {
            Target::Stdout => Box::new(std::io::stdout()),
            Target::File(p) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            ),
        };
        let (tx, rx) = sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(rx, out))?;
        Ok(Self {
            tx,
            sample: sample.clamp(0.0, 1.0),
            metrics,
        })
    }

    /// Queue `rec` to be written, if sampling keeps it: every failure (a status of 500 or
    /// more, an answer of the proxy's own, a TCP connection that did not end normally),
    /// and `sample` (or its route rule's) of the rest. A rule that turns logging off was
    /// left out before this.
    pub fn write(&self, rec: Arc<Record>) {
        let (failed, sample) = match &*rec {
            Record::Http(r) => (
                r.status >= 500 || r.reason.is_some(),
                r.access_log.and_then(|a| a.sample).unwrap_or(self.sample),
            ),
            Record::Tcp(r) => (r.outcome != "done", self.sample),
        };
        if !failed && sample < 1.0 && fastrand::f64() >= sample {
            return;
        }
        match self.tx.try_send(rec) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                Metrics::inc(&self.metrics.access_log_dropped);
            }
        }
    }
}

/// Write what arrives, flushing whenever the queue runs empty.
fn write_lines(rx: Receiver<Arc<Record>>, out: Box<dyn std::io::Write + Send>) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    let mut line = Vec::with_capacity(1024);
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(rec) = next {
            line.clear();
            if serde_json::to_writer(&mut line, &*rec).is_ok() {
                line.push(b'\n');
                if out.write_all(&line).is_err() {
                    return;
                }
            }
            next = rx.try_recv().ok();
        }
        if out.flush().is_err() {
            return;
        }
    }
}
