//! weft-testpod: the programs the simulated cluster runs inside its pods.
//!
//! - `http-server PORT NAME [BYTES] [delay=MS] [fail=N/M] [status=CODE]`: answers every
//!   HTTP request with `{"server":NAME,"peer":"IP:PORT",...}`, the peer being the address
//!   the server saw, and logs `served PEER`; with BYTES, the body is padded to that size
//!   and nothing is logged. `delay` waits before answering; `fail=N/M` answers N of every
//!   M requests with CODE (default 503) instead. `ramp=MS ramp-after=S` adds MS ms of
//!   delay per second from S s after the start; `fail-after=S` fails every request from
//!   S s after the start.
//! - `h2-server PORT NAME BYTES`: HTTP/1.1 and HTTP/2 with prior knowledge (h2c) on one
//!   port (hyper), answering every request with BYTES bytes.
//! - `echo-server PORT`: echoes every TCP byte back; on the client's half-close it
//!   finishes echoing, then half-closes too.
//! - `dns-server PORT IP`: answers every UDP DNS query with one A record holding IP.
//! - `echo-client ADDR BYTES`: sends BYTES pseudo-random bytes, half-closes, reads the echo
//!   until EOF and exits 0 only if it matches byte for byte.
//! - `http-loop ADDR MILLIS`: one HTTP request per new connection, back to back, for
//!   MILLIS (at most 100,000 requests); prints `ok=N failed=M` and fails if M > 0.
//! - `http-count ADDR PATH N [NAME:VALUE]`: N requests on one keep-alive connection (with
//!   that header); prints a JSON object counting the answers by server name and status.
//! - `http-load ADDR PATH N CONC [post=BYTES] [header=NAME:VALUE]`: N requests over CONC
//!   keep-alive connections at once; prints a JSON object counting the answers as
//!   "STATUS SERVER", or "STATUS REASON" for the proxy's own answers (x-weft-reason).
//! - `grpc-server PORT`: HTTP/2 answers in gRPC's shape: a body, then trailers
//!   `grpc-status: 0` and `x-saw-te` (the request's TE header).
//! - `grpc-call ADDR`: one gRPC-shaped POST over h2c; prints the status and trailers as
//!   JSON and fails without trailers.
//! - `name-server PORT NAME`: reads what a client sends first, answers `NAME` and closes
//!   (a stand-in for a TLS server: which backend got the connection).
//! - `tls-hello ADDR NAME`: sends a TLS ClientHello asking for server name NAME and
//!   prints the answer (`closed` if the connection closed without one).
//! - `h1-abuse ADDR MODE`: one HTTP/1.1 request crossing a limit (`many-headers`: 150
//!   fields, `big-header`: one 80 KiB field, `smuggle`: Content-Length with
//!   Transfer-Encoding, `slow-head`: half a head, then nothing) or broken by the client
//!   (`bad-chunk`: a chunk size that is not hex, `short-body`: less body than its
//!   Content-Length, then a half-close, `reset-mid`: the same, then a reset); prints JSON
//!   with the status (0 for none), whether the connection was closed, and the time taken.
//! - `h2-abuse ADDR MODE`: raw HTTP/2 frames crossing a limit (`rapid-reset`: HEADERS +
//!   RST_STREAM pairs, `continuation`: an endless header block, `streams`: 400 concurrent
//!   streams, `window`: DATA beyond the stream window); prints JSON with the GOAWAY code,
//!   the RST_STREAM codes received, whether the connection closed, and frames sent.
//! - `h2-streams ADDR N`: one HTTP/2 (h2c) connection, N concurrent requests on it;
//!   prints `ok=K` and fails unless all N got 200.
//! - `h2-load ADDR MILLIS CONC`: CONC workers sending HTTP/2 (h2c) requests back to back
//!   for MILLIS through a pooled client (hyper's), which opens a new connection when a
//!   server sends GOAWAY; prints JSON with the answers by status, the failures and the
//!   first failure.
//! - `upgrade-server PORT`: answers an HTTP/1.1 Upgrade request with 101, then echoes.
//! - `upgrade-client ADDR`: asks ADDR to upgrade, then checks that bytes come back.
//! - `connect-echo ADDR MILLIS`: back-to-back new connections to an echo server, each
//!   sending and reading back one byte, for MILLIS (at most 1,000,000); prints JSON with the
//!   count, errors, rate, and connect and round-trip latency percentiles in microseconds.
//! - `connect ADDR`: one TCP connect with a 2 s timeout; prints `ok PEER`, PEER being what
//!   getpeername says the socket is connected to (the service address, for a service).
//! - `hold-echo ADDR MILLIS INTERVAL`: one TCP connection to an echo server, a byte sent
//!   and echoed every INTERVAL ms for MILLIS, getpeername checked each time; prints JSON
//!   with the rounds, the failed ones, and whether getpeername stayed ADDR.
//! - `udp-watch ADDR MILLIS INTERVAL`: one unconnected UDP socket sending a DNS query to
//!   ADDR every INTERVAL ms for MILLIS; prints JSON counting answers, answers from another
//!   source than ADDR, and queries without an answer within 2 s.
//! - `hold-many ADDR N MILLIS`: up to N connections to an echo server at once (500 ms to
//!   connect each), a byte sent on each, the echoes that came within 500 ms counted; all
//!   held for MILLIS more, then closed; prints JSON with how many were opened and echoed.
//! - `udp-churn ADDR MILLIS`: a new UDP socket for every datagram to ADDR, as fast as it
//!   can for MILLIS (at most 10,000,000); prints the count.
//! - `udp-query ADDR NAME`: one DNS A query from an unconnected UDP socket; prints the
//!   answer, and fails unless the reply's source is ADDR itself.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::ExitCode,
    time::Duration,
};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let res = match a.as_slice() {
        ["http-server", port, name, opts @ ..] => match ServerOpts::parse(opts) {
            Ok(o) => http_server(port, name, o),
            Err(e) => Err(e),
        },
        ["echo-server", port] => echo_server(port),
        ["h2-server", port, name, size] => match size.parse() {
            Ok(n) => h2_server(port, name, n),
            Err(e) => Err(format!("{size}: {e}")),
        },
        ["dns-server", port, ip] => dns_server(port, ip),
        ["echo-client", addr, bytes] => echo_client(addr, bytes),
        ["connect", addr] => connect(addr),
        ["hold-echo", addr, millis, interval] => hold_echo(addr, millis, interval),
        ["udp-watch", addr, millis, interval] => udp_watch(addr, millis, interval),
        ["udp-churn", addr, millis] => udp_churn(addr, millis),
        ["hold-many", addr, n, millis] => hold_many(addr, n, millis),
        ["http-loop", addr, millis] => http_loop(addr, millis),
        ["connect-echo", addr, millis] => connect_echo(addr, millis),
        ["upgrade-server", port] => upgrade_server(port),
        ["h2-streams", addr, n] => h2_streams(addr, n),
        ["h2-load", addr, millis, conc] => h2_load(addr, millis, conc),
        ["upgrade-client", addr] => upgrade_client(addr),
        ["http-count", addr, path, n] => http_count(addr, path, n, None),
        ["http-count", addr, path, n, header] => http_count(addr, path, n, Some(header)),
        ["http-load", addr, path, n, conc, opts @ ..] => http_load(addr, path, n, conc, opts),
        ["grpc-server", port] => grpc_server(port),
        ["h1-abuse", addr, mode] => h1_abuse(addr, mode),
        ["name-server", port, name] => name_server(port, name),
        ["tls-hello", addr, name] => tls_hello(addr, name),
        ["h2-abuse", addr, mode] => h2_abuse(addr, mode),
        ["grpc-call", addr] => grpc_call(addr),
        ["udp-query", addr, name] => udp_query(addr, name),
        _ => Err("usage: weft-testpod http-server PORT NAME | echo-server PORT | dns-server PORT IP | echo-client ADDR BYTES | connect ADDR".into()),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-testpod: {e}");
            ExitCode::FAILURE
        }
    }
}

type Res = Result<(), String>;

fn listen(port: &str) -> Result<TcpListener, String> {
    TcpListener::bind(format!("0.0.0.0:{port}")).map_err(|e| format!("bind {port}: {e}"))
}

/// How an `http-server` behaves.
#[derive(Clone, Copy, Default)]
struct ServerOpts {
    size: usize,
    delay: Duration,
    /// Fail `fail.0` of every `fail.1` requests.
    fail: (u64, u64),
    status: u16,
    /// From `ramp_after` after the start, `ramp` more delay per second.
    ramp: Duration,
    ramp_after: Duration,
    /// From this long after the start, fail every request.
    fail_after: Option<Duration>,
}

impl ServerOpts {
    fn parse(args: &[&str]) -> Result<Self, String> {
        let mut o = Self {
            status: 503,
            ..Self::default()
        };
        let num = |v: &str| v.parse::<u64>().map_err(|e| format!("{v}: {e}"));
        for a in args {
            match a.split_once('=') {
                None => o.size = num(a)? as usize,
                Some(("delay", v)) => o.delay = Duration::from_millis(num(v)?),
                Some(("status", v)) => o.status = num(v)? as u16,
                Some(("ramp", v)) => o.ramp = Duration::from_millis(num(v)?),
                Some(("ramp-after", v)) => o.ramp_after = Duration::from_secs(num(v)?),
                Some(("fail-after", v)) => o.fail_after = Some(Duration::from_secs(num(v)?)),
                Some(("fail", v)) => {
                    let (n, m) = v.split_once('/').ok_or("fail=N/M")?;
                    o.fail = (num(n)?, num(m)?.max(1));
                }
                Some((k, _)) => return Err(format!("unknown option {k}")),
            }
        }
        Ok(o)
    }
}

fn http_server(port: &str, name: &str, opts: ServerOpts) -> Res {
    let l = listen(port)?;
    let started = std::time::Instant::now();
    let served = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    for conn in l.incoming() {
        let Ok(mut c) = conn else { continue };
        let name = name.to_owned();
        let served = served.clone();
        std::thread::spawn(move || {
            let body_size = opts.size;
            let quiet = body_size > 0;
            let peer = c.peer_addr().map(|p| p.to_string()).unwrap_or_default();
            let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            // Serve keep-alive requests until the client closes.
            loop {
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match c.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let end = buf
                    .windows(4)
                    .position(|w| w == b"\r\n\r\n")
                    .expect("checked")
                    + 4;
                let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                buf.drain(..end);
                // The request body, by its content-length (the tests send no chunked bodies).
                let body_len: usize = head
                    .to_ascii_lowercase()
                    .lines()
                    .find_map(|l| {
                        l.strip_prefix("content-length:")
                            .map(|v| v.trim().to_owned())
                    })
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                while buf.len() < body_len {
                    match c.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                buf.drain(..body_len);
                let k = served.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if !quiet {
                    println!("served {peer}");
                }
                let since = started.elapsed();
                let ramped = opts
                    .ramp
                    .mul_f64(since.saturating_sub(opts.ramp_after).as_secs_f64());
                let delay = opts.delay + ramped;
                if !delay.is_zero() {
                    std::thread::sleep(delay);
                }
                let fails = k % opts.fail.1.max(1) < opts.fail.0
                    || opts.fail_after.is_some_and(|f| since >= f);
                let mut body =
                    format!("{{\"server\":\"{name}\",\"peer\":\"{peer}\",\"body_len\":{body_len}");
                if !quiet {
                    // What arrived: the request target and the x-* and host headers.
                    let mut lines = head.lines();
                    let target = lines.next().and_then(|l| l.split(' ').nth(1)).unwrap_or("");
                    body.push_str(&format!(",\"path\":{target:?},\"headers\":{{"));
                    let hs: Vec<String> = lines
                        .filter_map(|l| l.split_once(':'))
                        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
                        .filter(|(k, _)| k.starts_with("x-") || k == "host")
                        .map(|(k, v)| format!("{k:?}:{v:?}"))
                        .collect();
                    body.push_str(&hs.join(","));
                    body.push('}');
                }
                if body.len() + 11 < body_size {
                    // Pad to the requested size (benchmarks ask for 1 KiB responses).
                    let pad = body_size - body.len() - 11;
                    body.push_str(&format!(",\"pad\":\"{}\"", "x".repeat(pad)));
                }
                body.push_str("}\n");
                let status = if fails {
                    format!("{} Failing", opts.status)
                } else {
                    "200 OK".to_owned()
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                if c.write_all(resp.as_bytes()).is_err() {
                    return;
                }
            }
        });
    }
    Ok(())
}

fn h2_server(port: &str, name: &str, size: usize) -> Res {
    use http_body_util::Full;
    use hyper::{body::Bytes, service::service_fn, Response};
    use hyper_util::{
        rt::{TokioExecutor, TokioIo},
        server::conn::auto,
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let mut body = format!("{{\"server\":\"{name}\"");
    if body.len() + 11 < size {
        body.push_str(&format!(
            ",\"pad\":\"{}\"",
            "x".repeat(size - body.len() - 11)
        ));
    }
    body.push_str("}\n");
    let body = Bytes::from(body);
    rt.block_on(async move {
        let l = tokio::net::TcpListener::bind(format!("0.0.0.0:{port}"))
            .await
            .map_err(|e| format!("bind {port}: {e}"))?;
        loop {
            let (c, _) = l.accept().await.map_err(|e| e.to_string())?;
            let _ = c.set_nodelay(true);
            let body = body.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |_req| {
                    let body = body.clone();
                    async move { Ok::<_, std::convert::Infallible>(Response::new(Full::new(body))) }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(c), svc)
                    .await;
            });
        }
    })
}

fn echo_server(port: &str) -> Res {
    let l = listen(port)?;
    for conn in l.incoming() {
        let Ok(mut c) = conn else { continue };
        std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            loop {
                match c.read(&mut buf) {
                    Ok(0) => {
                        let _ = c.shutdown(Shutdown::Write);
                        return;
                    }
                    Ok(n) => {
                        if c.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
        });
    }
    Ok(())
}

fn dns_server(port: &str, ip: &str) -> Res {
    let answer: std::net::Ipv4Addr = ip.parse().map_err(|e| format!("{ip}: {e}"))?;
    let s =
        UdpSocket::bind(format!("0.0.0.0:{port}")).map_err(|e| format!("bind udp {port}: {e}"))?;
    let mut buf = [0u8; 512];
    loop {
        let (n, from) = s.recv_from(&mut buf).map_err(|e| e.to_string())?;
        if n < 12 {
            continue;
        }
        // Find the end of the question (QNAME labels, then QTYPE and QCLASS).
        let mut i = 12;
        while i < n && buf[i] != 0 {
            i += buf[i] as usize + 1;
        }
        let qend = i + 5;
        if qend > n {
            continue;
        }
        let mut resp = buf[..qend].to_vec();
        resp[2] = 0x81; // QR, RD
        resp[3] = 0x80; // RA, NOERROR
        resp[6..8].copy_from_slice(&1u16.to_be_bytes()); // ANCOUNT
        resp[8..12].fill(0);
        // Answer: pointer to the QNAME, type A, class IN, TTL 30, 4 bytes of address.
        resp.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4]);
        resp.extend_from_slice(&answer.octets());
        let _ = s.send_to(&resp, from);
    }
}

fn echo_client(addr: &str, bytes: &str) -> Res {
    let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let len: usize = bytes.parse().map_err(|e| format!("{bytes}: {e}"))?;
    let data = pattern(len);
    let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    c.set_read_timeout(Some(Duration::from_secs(20)))
        .map_err(|e| e.to_string())?;
    let mut w = c.try_clone().map_err(|e| e.to_string())?;
    let writer = std::thread::spawn(move || -> Res {
        w.write_all(&data).map_err(|e| format!("write: {e}"))?;
        w.shutdown(Shutdown::Write)
            .map_err(|e| format!("half-close: {e}"))?;
        Ok(())
    });
    let mut got = Vec::with_capacity(len);
    c.read_to_end(&mut got).map_err(|e| format!("read: {e}"))?;
    writer.join().map_err(|_| "writer panicked")??;
    let want = pattern(len);
    if got != want {
        let first = got.iter().zip(&want).position(|(a, b)| a != b);
        return Err(format!(
            "echo differs: sent {len} bytes, got {} back, first difference at {first:?}",
            got.len()
        ));
    }
    println!("echoed {len} bytes intact");
    Ok(())
}

fn http_loop(addr: &str, millis: &str) -> Res {
    let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let ms: u64 = millis.parse().map_err(|e| format!("{millis}: {e}"))?;
    let end = std::time::Instant::now() + Duration::from_millis(ms);
    let (mut ok, mut failed) = (0u64, 0u64);
    let mut first_error = None;
    while std::time::Instant::now() < end && ok + failed < 100_000 {
        match one_request(addr) {
            Ok(()) => ok += 1,
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    println!("ok={ok} failed={failed}");
    match first_error {
        None => Ok(()),
        Some(e) => Err(format!(
            "{failed} of {} requests failed; first: {e}",
            ok + failed
        )),
    }
}

/// Read an HTTP head (up to the blank line) byte by byte, so nothing after it is consumed.
fn read_head(c: &mut TcpStream) -> Result<String, String> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match c.read(&mut b) {
            Ok(0) => return Err("closed before the end of the head".into()),
            Ok(_) => head.push(b[0]),
            Err(e) => return Err(format!("read: {e}")),
        }
        if head.len() > 16384 {
            return Err("head too long".into());
        }
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// An HTTP/2 (h2c, prior knowledge) client connection to `addr`, driven in the background.
async fn h2_connect<B>(
    addr: SocketAddr,
) -> Result<hyper::client::conn::http2::SendRequest<B>, String>
where
    B: hyper::body::Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .map_err(|e| format!("h2 handshake: {e}"))?;
    tokio::spawn(conn);
    Ok(sender)
}

fn h2_load(addr: &str, millis: &str, conc: &str) -> Res {
    use http_body_util::{BodyExt as _, Empty};
    use hyper::{body::Bytes, Request};
    use hyper_util::{client::legacy::Client, rt::TokioExecutor};

    let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let (ms, conc) = (num(millis)?, num(conc)?.clamp(1, 256));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build_http();
        let end = tokio::time::Instant::now() + Duration::from_millis(ms);
        let workers: Vec<_> = (0..conc)
            .map(|_| {
                let client = client.clone();
                tokio::spawn(async move {
                    let (mut ok, mut failed, mut other, mut first) = (0u64, 0u64, 0u64, None);
                    while tokio::time::Instant::now() < end && ok + failed + other < 1_000_000 {
                        let req = Request::get(format!("http://{addr}/"))
                            .body(Empty::<Bytes>::new())
                            .expect("a request");
                        match client.request(req).await {
                            Ok(r) => {
                                let status = r.status();
                                match r.into_body().collect().await {
                                    Ok(_) if status == 200 => ok += 1,
                                    Ok(_) => other += 1,
                                    Err(e) => {
                                        failed += 1;
                                        first.get_or_insert(e.to_string());
                                    }
                                }
                            }
                            Err(e) => {
                                failed += 1;
                                first.get_or_insert(format!("{e:?}"));
                            }
                        }
                    }
                    (ok, failed, other, first)
                })
            })
            .collect();
        let (mut ok, mut failed, mut other, mut first) = (0, 0, 0, None);
        for w in workers {
            let (o, f, x, e) = w.await.map_err(|e| e.to_string())?;
            ok += o;
            failed += f;
            other += x;
            if first.is_none() {
                first = e;
            }
        }
        println!(
            "{}",
            serde_json::json!({"ok": ok, "failed": failed, "non_200": other, "first_failure": first})
        );
        Ok(())
    })
}

fn h2_streams(addr: &str, n: &str) -> Res {
    use http_body_util::{BodyExt as _, Empty};
    use hyper::{body::Bytes, Request};

    let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let n: usize = n.parse().map_err(|e| format!("{n}: {e}"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let sender = h2_connect(addr).await?;
        let tasks: Vec<_> = (0..n.min(10_000))
            .map(|i| {
                let mut sender = sender.clone();
                tokio::spawn(async move {
                    let req = Request::get(format!("http://{addr}/stream/{i}"))
                        .body(Empty::<Bytes>::new())
                        .map_err(|e| e.to_string())?;
                    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
                    let status = resp.status();
                    resp.into_body()
                        .collect()
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok::<_, String>(status.as_u16())
                })
            })
            .collect();
        let mut ok = 0;
        let mut first_err = None;
        for t in tasks {
            match t.await {
                Ok(Ok(200)) => ok += 1,
                Ok(Ok(s)) => {
                    first_err.get_or_insert(format!("status {s}"));
                }
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(e) => {
                    first_err.get_or_insert(e.to_string());
                }
            }
        }
        println!("ok={ok}");
        match first_err {
            None => Ok(()),
            Some(e) => Err(format!("{} of {n} streams failed; first: {e}", n - ok)),
        }
    })
}

fn upgrade_server(port: &str) -> Res {
    let l = listen(port)?;
    for conn in l.incoming() {
        let Ok(mut c) = conn else { continue };
        std::thread::spawn(move || {
            let Ok(head) = read_head(&mut c) else { return };
            if !head.to_ascii_lowercase().contains("\r\nupgrade: weft-echo") {
                let _ = c.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n");
                return;
            }
            if c.write_all(b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: weft-echo\r\n\r\n").is_err() {
                return;
            }
            let mut buf = [0u8; 4096];
            while let Ok(n) = c.read(&mut buf) {
                if n == 0 || c.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        });
    }
    Ok(())
}

fn upgrade_client(addr: &str) -> Res {
    let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    c.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    c.write_all(
        format!(
            "GET /chat HTTP/1.1\r\nhost: {}\r\nconnection: upgrade\r\nupgrade: weft-echo\r\n\r\n",
            addr.ip()
        )
        .as_bytes(),
    )
    .map_err(|e| format!("write: {e}"))?;
    let head = read_head(&mut c)?;
    if !head.starts_with("HTTP/1.1 101") {
        return Err(format!("no upgrade: {}", head.lines().next().unwrap_or("")));
    }
    for msg in [&b"ping over the upgraded connection\n"[..], b"and again\n"] {
        c.write_all(msg).map_err(|e| format!("write: {e}"))?;
        let mut back = vec![0u8; msg.len()];
        c.read_exact(&mut back)
            .map_err(|e| format!("read echo: {e}"))?;
        if back != msg {
            return Err(format!(
                "echo differs: {:?}",
                String::from_utf8_lossy(&back)
            ));
        }
    }
    println!("upgraded and echoed");
    Ok(())
}

fn http_count(addr: &str, path: &str, n: &str, header: Option<&str>) -> Res {
    let mut args = vec![];
    let h = header.map(|h| format!("header={h}"));
    args.extend(h.as_deref());
    http_load(addr, path, n, "1", &args)
}

/// One response read off a keep-alive connection: status, lowercased head, body.
fn read_response(c: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(String, String, String), String> {
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let k = c.read(&mut chunk).map_err(|e| format!("read: {e}"))?;
        if k == 0 {
            return Err("connection closed mid-response".into());
        }
        buf.extend_from_slice(&chunk[..k]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let status = head.split(' ').nth(1).unwrap_or("?").to_owned();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let k = c.read(&mut chunk).map_err(|e| format!("read: {e}"))?;
        if k == 0 {
            return Err("connection closed mid-body".into());
        }
        buf.extend_from_slice(&chunk[..k]);
    }
    let body = String::from_utf8_lossy(&buf[head_end..head_end + len]).into_owned();
    buf.drain(..head_end + len);
    Ok((status, head, body))
}

/// `http-load ADDR PATH N CONC [post=BYTES] [header=NAME:VALUE]...`: N requests over CONC
/// keep-alive connections at once; prints a JSON object counting the answers as
/// "STATUS SERVER" (the app's) or "STATUS REASON" (the proxy's x-weft-reason).
fn http_load(addr: &str, path: &str, n: &str, conc: &str, opts: &[&str]) -> Res {
    let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let n: usize = n.parse().map_err(|e| format!("{n}: {e}"))?;
    let conc: usize = conc.parse().map_err(|e| format!("{conc}: {e}"))?;
    let (mut extra, mut body) = (String::new(), String::new());
    for o in opts {
        match o.split_once('=') {
            Some(("header", h)) => extra.push_str(&format!("{h}\r\n")),
            Some(("post", b)) => {
                let len: usize = b.parse().map_err(|e| format!("{b}: {e}"))?;
                body = "b".repeat(len);
            }
            _ => return Err(format!("unknown option {o}")),
        }
    }
    let method = if body.is_empty() { "GET" } else { "POST" };
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: {}\r\ncontent-length: {}\r\n{extra}\r\n{body}",
        addr.ip(),
        body.len()
    );
    let n = n.min(100_000);
    let conc = conc.clamp(1, 256);
    let workers: Vec<_> = (0..conc)
        .map(|w| {
            let req = req.clone();
            let share = n / conc + usize::from(w < n % conc);
            std::thread::spawn(move || -> Result<Vec<String>, String> {
                let mut keys = vec![];
                let mut conn: Option<TcpStream> = None;
                let mut buf = Vec::new();
                for _ in 0..share {
                    let c = match &mut conn {
                        Some(c) => c,
                        None => {
                            let c = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
                                .map_err(|e| format!("connect {addr}: {e}"))?;
                            c.set_read_timeout(Some(Duration::from_secs(20)))
                                .map_err(|e| e.to_string())?;
                            buf.clear();
                            conn.insert(c)
                        }
                    };
                    c.write_all(req.as_bytes())
                        .map_err(|e| format!("write: {e}"))?;
                    let (status, head, body) = read_response(c, &mut buf)?;
                    let who = match head.lines().find_map(|l| l.strip_prefix("x-weft-reason:")) {
                        Some(reason) => reason.trim().to_owned(),
                        None => body
                            .split("\"server\":\"")
                            .nth(1)
                            .and_then(|r| r.split('"').next())
                            .unwrap_or("-")
                            .to_owned(),
                    };
                    keys.push(format!("{status} {who}"));
                    if head.lines().any(|l| l.trim() == "connection: close") {
                        conn = None;
                    }
                }
                Ok(keys)
            })
        })
        .collect();
    let mut counts = std::collections::BTreeMap::<String, u64>::new();
    for w in workers {
        for k in w.join().map_err(|_| "worker panicked")?? {
            *counts.entry(k).or_default() += 1;
        }
    }
    let fields: Vec<String> = counts.iter().map(|(k, v)| format!("{k:?}:{v}")).collect();
    println!("{{{}}}", fields.join(","));
    Ok(())
}

fn connect_echo(addr: &str, millis: &str) -> Res {
    let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let ms: u64 = millis.parse().map_err(|e| format!("{millis}: {e}"))?;
    let t0 = std::time::Instant::now();
    let end = t0 + Duration::from_millis(ms);
    let (mut connect_us, mut total_us, mut errors) = (Vec::new(), Vec::new(), 0u64);
    while std::time::Instant::now() < end && connect_us.len() < 1_000_000 {
        let start = std::time::Instant::now();
        let Ok(mut c) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
            errors += 1;
            continue;
        };
        let connected = start.elapsed();
        let mut b = [0u8; 1];
        let ok = c.set_nodelay(true).is_ok()
            && c.write_all(b"x").is_ok()
            && c.read_exact(&mut b).is_ok();
        if !ok {
            errors += 1;
            continue;
        }
        connect_us.push(connected.as_secs_f64() * 1e6);
        total_us.push(start.elapsed().as_secs_f64() * 1e6);
    }
    let secs = t0.elapsed().as_secs_f64();
    let pct = |v: &mut Vec<f64>, p: f64| {
        v.sort_by(f64::total_cmp);
        v.get(((v.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    println!(
        "{{\"count\":{},\"errors\":{errors},\"rate\":{:.1},\"connect_p50_us\":{:.1},\"connect_p99_us\":{:.1},\"rtt_p50_us\":{:.1},\"rtt_p99_us\":{:.1}}}",
        connect_us.len(),
        connect_us.len() as f64 / secs,
        pct(&mut connect_us, 0.5),
        pct(&mut connect_us, 0.99),
        pct(&mut total_us, 0.5),
        pct(&mut total_us, 0.99),
    );
    Ok(())
}

fn one_request(addr: SocketAddr) -> Res {
    let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("connect: {e}"))?;
    c.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    c.write_all(b"GET / HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut resp = Vec::new();
    let mut buf = [0u8; 1024];
    // The test server keeps connections open: read until the body's newline.
    while !resp.ends_with(b"}\n") {
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => resp.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    if resp.starts_with(b"HTTP/1.1 200") && resp.ends_with(b"}\n") {
        Ok(())
    } else {
        Err(format!("bad response {:?}", String::from_utf8_lossy(&resp)))
    }
}

fn udp_query(addr: &str, name: &str) -> Res {
    let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.').filter(|l| !l.is_empty()) {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    s.send_to(&q, addr)
        .map_err(|e| format!("send_to {addr}: {e}"))?;
    let mut buf = [0u8; 512];
    let (n, from) = s
        .recv_from(&mut buf)
        .map_err(|e| format!("recv_from: {e}"))?;
    if from != addr {
        return Err(format!("reply came from {from}, not from {addr}"));
    }
    if n < 4 || buf[..2] != [0x12, 0x34] {
        return Err("reply does not answer the query".into());
    }
    let ip = &buf[n - 4..n];
    println!("{}.{}.{}.{}", ip[0], ip[1], ip[2], ip[3]);
    Ok(())
}

/// `len` pseudo-random bytes (xorshift): reproducible, and patterned enough that
/// reordering, loss or corruption shows.
fn pattern(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ len as u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn connect(addr: &str) -> Res {
    let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
        Ok(c) => {
            let peer = c.peer_addr().map_err(|e| format!("getpeername: {e}"))?;
            println!("ok {peer}");
            Ok(())
        }
        Err(e) => Err(format!("connect {addr}: {e}")),
    }
}

fn num(v: &str) -> Result<u64, String> {
    v.parse().map_err(|e| format!("{v}: {e}"))
}

fn hold_echo(addr: &str, millis: &str, interval: &str) -> Res {
    let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let (ms, every) = (num(millis)?, Duration::from_millis(num(interval)?));
    let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    c.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    let end = std::time::Instant::now() + Duration::from_millis(ms);
    let (mut rounds, mut failed, mut peer_ok) = (0u64, 0u64, true);
    while std::time::Instant::now() < end {
        let mut b = [0u8; 1];
        let ok = c.write_all(&[rounds as u8]).is_ok()
            && c.read_exact(&mut b).is_ok()
            && b[0] == rounds as u8;
        if !ok {
            failed += 1;
        }
        peer_ok &= c.peer_addr().is_ok_and(|p| p == addr);
        rounds += 1;
        std::thread::sleep(every);
    }
    println!("{{\"rounds\":{rounds},\"failed\":{failed},\"peer_ok\":{peer_ok}}}");
    Ok(())
}

fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.').filter(|l| !l.is_empty()) {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

fn udp_watch(addr: &str, millis: &str, interval: &str) -> Res {
    let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let (ms, every) = (num(millis)?, Duration::from_millis(num(interval)?));
    let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    let end = std::time::Instant::now() + Duration::from_millis(ms);
    let (mut answered, mut wrong_source, mut lost, mut id) = (0u64, 0u64, 0u64, 0u16);
    let mut buf = [0u8; 512];
    while std::time::Instant::now() < end {
        id = id.wrapping_add(1);
        s.send_to(&dns_query(id, "watch.test"), addr)
            .map_err(|e| format!("send_to {addr}: {e}"))?;
        match s.recv_from(&mut buf) {
            Ok((n, from)) if n >= 2 && buf[..2] == id.to_be_bytes() => {
                if from == addr {
                    answered += 1;
                } else {
                    wrong_source += 1;
                }
            }
            _ => lost += 1,
        }
        std::thread::sleep(every);
    }
    println!("{{\"answered\":{answered},\"wrong_source\":{wrong_source},\"lost\":{lost}}}");
    Ok(())
}

fn hold_many(addr: &str, n: &str, millis: &str) -> Res {
    let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let (n, ms) = (num(n)?.min(10_000), num(millis)?);
    let mut held = vec![];
    for i in 0..n {
        if let Ok(mut c) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            let _ = c.write_all(&[i as u8]);
            held.push(c);
        }
    }
    // Every echo that is coming has come by now.
    std::thread::sleep(Duration::from_millis(500));
    let mut echoed = 0u64;
    for c in &mut held {
        let _ = c.set_nonblocking(true);
        let mut b = [0u8; 1];
        if matches!(c.read(&mut b), Ok(1)) {
            echoed += 1;
        }
    }
    std::thread::sleep(Duration::from_millis(ms));
    println!("{{\"opened\":{},\"echoed\":{echoed}}}", held.len());
    Ok(())
}

fn udp_churn(addr: &str, millis: &str) -> Res {
    let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let end = std::time::Instant::now() + Duration::from_millis(num(millis)?);
    let q = dns_query(7, "churn.test");
    let mut sent = 0u64;
    while std::time::Instant::now() < end && sent < 10_000_000 {
        let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
        if s.send_to(&q, addr).is_ok() {
            sent += 1;
        }
    }
    println!("{{\"sent\":{sent}}}");
    Ok(())
}

fn grpc_server(port: &str) -> Res {
    use http_body_util::BodyExt as _;
    use hyper::{
        body::{Bytes, Frame},
        service::service_fn,
        HeaderMap, Response,
    };
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let l = tokio::net::TcpListener::bind(format!("0.0.0.0:{port}"))
            .await
            .map_err(|e| format!("bind {port}: {e}"))?;
        loop {
            let (c, _) = l.accept().await.map_err(|e| e.to_string())?;
            tokio::spawn(async move {
                let svc = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                    let te = req
                        .headers()
                        .get("te")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("none")
                        .to_owned();
                    let _ = req.into_body().collect().await;
                    let mut trailers = HeaderMap::new();
                    trailers.insert("grpc-status", "0".parse().expect("valid"));
                    trailers.insert(
                        "x-saw-te",
                        te.parse().unwrap_or("?".parse().expect("valid")),
                    );
                    let body = Frames(
                        [
                            Frame::data(Bytes::from_static(b"\0\0\0\0\x02hi")),
                            Frame::trailers(trailers),
                        ]
                        .into(),
                    );
                    let mut resp = Response::new(body);
                    resp.headers_mut()
                        .insert("content-type", "application/grpc".parse().expect("valid"));
                    Ok::<_, std::convert::Infallible>(resp)
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(c), svc)
                    .await;
            });
        }
    })
}

/// A response body of fixed frames (data, then trailers).
struct Frames(std::collections::VecDeque<hyper::body::Frame<hyper::body::Bytes>>);

impl hyper::body::Body for Frames {
    type Data = hyper::body::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::task::Poll::Ready(self.get_mut().0.pop_front().map(Ok))
    }
}

fn grpc_call(addr: &str) -> Res {
    use http_body_util::{BodyExt as _, Full};
    use hyper::{body::Bytes, Request};

    let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let mut sender = h2_connect(addr).await?;
        let req = Request::post(format!("http://{addr}/echo.Echo/Say"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::from_static(b"\0\0\0\0\x02yo")))
            .map_err(|e| e.to_string())?;
        let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
            .await
            .map_err(|_| "timed out")?
            .map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let collected = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        let trailers = collected.trailers().cloned().ok_or("no trailers")?;
        let t: Vec<String> = trailers
            .iter()
            .map(|(k, v)| format!("{:?}:{:?}", k.as_str(), v.to_str().unwrap_or("?")))
            .collect();
        println!("{{\"status\":{status},\"trailers\":{{{}}}}}", t.join(","));
        Ok(())
    })
}

fn h1_abuse(addr: &str, mode: &str) -> Res {
    let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let host = addr.ip();
    let req = match mode {
        "many-headers" => {
            let fields: String = (0..150).map(|i| format!("x-h{i}: {i}\r\n")).collect();
            format!("GET / HTTP/1.1\r\nhost: {host}\r\n{fields}\r\n")
        }
        "big-header" => format!(
            "GET / HTTP/1.1\r\nhost: {host}\r\nx-big: {}\r\n\r\n",
            "a".repeat(80 * 1024)
        ),
        "smuggle" => format!(
            "POST / HTTP/1.1\r\nhost: {host}\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: {host}\r\n\r\n"
        ),
        "slow-head" => format!("GET / HTTP/1.1\r\nhost: {host}\r\nx-never: fin"),
        "bad-chunk" => format!(
            "POST / HTTP/1.1\r\nhost: {host}\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\nnot-hex\r\n"
        ),
        "short-body" | "reset-mid" => format!(
            "POST / HTTP/1.1\r\nhost: {host}\r\ncontent-length: 1000\r\n\r\nfar fewer than a thousand bytes"
        ),
        other => return Err(format!("unknown mode {other}")),
    };
    let started = std::time::Instant::now();
    let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    c.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    // The server may answer (and close) before it has read everything.
    let _ = c.write_all(req.as_bytes());
    match mode {
        // The body ends early: half-close, the answer is still read.
        "bad-chunk" | "short-body" => {
            let _ = c.shutdown(Shutdown::Write);
        }
        // Gone mid-body: reset (SO_LINGER 0), nothing is read.
        "reset-mid" => {
            std::thread::sleep(Duration::from_millis(5));
            let s = socket2::SockRef::from(&c);
            let _ = s.set_linger(Some(Duration::ZERO));
            drop(c);
            println!("{{\"status\":0,\"responses\":0,\"reason\":\"\",\"closed\":true,\"ms\":0}}");
            return Ok(());
        }
        _ => {}
    }
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    let closed = loop {
        match c.read(&mut chunk) {
            Ok(0) => break true,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(_) => break false, // read timeout: still open
        }
    };
    let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
    let status: u16 = text
        .strip_prefix("http/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let responses = text.matches("http/1.1 ").count();
    let reason = text
        .lines()
        .find_map(|l| l.strip_prefix("x-weft-reason:"))
        .unwrap_or("")
        .trim()
        .to_owned();
    println!(
        "{{\"status\":{status},\"responses\":{responses},\"reason\":{reason:?},\"closed\":{closed},\"ms\":{}}}",
        started.elapsed().as_millis()
    );
    Ok(())
}

/// One HTTP/2 frame.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK string or integer length with a 7-bit prefix (no Huffman).
fn hpack_len(n: usize, out: &mut Vec<u8>) {
    if n < 127 {
        out.push(n as u8);
        return;
    }
    out.push(127);
    let mut rest = n - 127;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

/// HPACK block of a `GET /` to `authority`: static-table :method, :scheme and :path,
/// literal :authority.
fn h2_get(authority: &str) -> Vec<u8> {
    let mut b = vec![0x82, 0x86, 0x84, 0x01];
    hpack_len(authority.len(), &mut b);
    b.extend_from_slice(authority.as_bytes());
    b
}

fn h2_abuse(addr: &str, mode: &str) -> Res {
    const DATA: u8 = 0;
    const HEADERS: u8 = 1;
    const RST_STREAM: u8 = 3;
    const SETTINGS: u8 = 4;
    const GOAWAY: u8 = 7;
    const CONTINUATION: u8 = 9;
    const END_STREAM: u8 = 1;
    const END_HEADERS: u8 = 4;

    let sa: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let mut c = TcpStream::connect_timeout(&sa, Duration::from_secs(3))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let mut reader = c.try_clone().map_err(|e| e.to_string())?;
    reader
        .set_read_timeout(Some(Duration::from_secs(3)))
        .map_err(|e| e.to_string())?;
    // The reader acknowledges the server's SETTINGS and records GOAWAY and RST_STREAM.
    let mut ack = c.try_clone().map_err(|e| e.to_string())?;
    let seen = std::thread::spawn(move || {
        let (mut goaway, mut resets) = (None::<u32>, std::collections::BTreeMap::<u32, u32>::new());
        let mut head = [0u8; 9];
        let closed = loop {
            if let Err(e) = reader.read_exact(&mut head) {
                break e.kind() != std::io::ErrorKind::WouldBlock
                    && e.kind() != std::io::ErrorKind::TimedOut;
            }
            let len =
                (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
            let mut payload = vec![0u8; len];
            if reader.read_exact(&mut payload).is_err() {
                break true;
            }
            let code = |at: usize| {
                payload
                    .get(at..at + 4)
                    .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                    .unwrap_or(u32::MAX)
            };
            match head[3] {
                SETTINGS if head[4] & 1 == 0 => {
                    let _ = ack.write_all(&h2_frame(SETTINGS, 1, 0, &[]));
                }
                GOAWAY => goaway = Some(code(4)),
                RST_STREAM => *resets.entry(code(0)).or_default() += 1,
                _ => {}
            }
        };
        (goaway, resets, closed)
    });
    c.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .map_err(|e| e.to_string())?;
    c.write_all(&h2_frame(SETTINGS, 0, 0, &[]))
        .map_err(|e| e.to_string())?;
    let get = h2_get(addr);
    let mut sent = 0u64;
    let mut send = |c: &mut TcpStream, frames: Vec<u8>, n: u64| -> bool {
        let ok = c.write_all(&frames).is_ok();
        if ok {
            sent += n;
        }
        ok
    };
    match mode {
        "rapid-reset" => {
            // HEADERS then RST_STREAM(CANCEL) on 5,000 streams, 100 pairs per write.
            'outer: for batch in 0..50u32 {
                let mut frames = Vec::new();
                for i in 0..100u32 {
                    let id = (batch * 100 + i) * 2 + 1;
                    frames.extend(h2_frame(HEADERS, END_STREAM | END_HEADERS, id, &get));
                    frames.extend(h2_frame(RST_STREAM, 0, id, &8u32.to_be_bytes()));
                }
                if !send(&mut c, frames, 200) {
                    break 'outer;
                }
            }
        }
        "continuation" => {
            // One header block that never ends: 16 KiB CONTINUATION frames, up to 64 MiB.
            let mut field = vec![0x00];
            hpack_len(7, &mut field);
            field.extend_from_slice(b"x-flood");
            hpack_len(16_000, &mut field);
            field.extend(std::iter::repeat_n(b'a', 16_000));
            if send(&mut c, h2_frame(HEADERS, END_STREAM, 1, &get), 1) {
                for _ in 0..4096 {
                    if !send(&mut c, h2_frame(CONTINUATION, 0, 1, &field), 1) {
                        break;
                    }
                }
            }
        }
        "streams" => {
            let mut frames = Vec::new();
            for i in 0..400u32 {
                frames.extend(h2_frame(HEADERS, END_STREAM | END_HEADERS, i * 2 + 1, &get));
            }
            send(&mut c, frames, 400);
        }
        "window" => {
            // A request body far beyond the stream window, to a server not reading it.
            if send(&mut c, h2_frame(HEADERS, END_HEADERS, 1, &get), 1) {
                let chunk = vec![b'd'; 16_384];
                for _ in 0..200 {
                    if !send(&mut c, h2_frame(DATA, 0, 1, &chunk), 1) {
                        break;
                    }
                }
            }
        }
        other => return Err(format!("unknown mode {other}")),
    }
    let (goaway, resets, closed) = seen.join().map_err(|_| "reader panicked")?;
    let resets: Vec<String> = resets.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
    println!(
        "{{\"goaway\":{},\"resets\":{{{}}},\"closed\":{closed},\"sent\":{sent}}}",
        goaway.map_or("null".into(), |g| g.to_string()),
        resets.join(",")
    );
    Ok(())
}

fn name_server(port: &str, name: &str) -> Res {
    let l = listen(port)?;
    for conn in l.incoming() {
        let Ok(mut c) = conn else { continue };
        let name = name.to_owned();
        std::thread::spawn(move || {
            let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
            let mut b = [0u8; 4096];
            if let Ok(n) = c.read(&mut b) {
                if n > 0 {
                    println!("served {n} bytes");
                    let _ = c.write_all(format!("{name}\n").as_bytes());
                }
            }
        });
    }
    Ok(())
}

/// A minimal TLS 1.2-shaped ClientHello with one cipher suite and a server_name.
fn client_hello(name: &str) -> Vec<u8> {
    let be = |n: usize| (n as u16).to_be_bytes();
    let mut sni = vec![0u8];
    sni.extend(be(name.len()));
    sni.extend(name.as_bytes());
    let mut ext = vec![0, 0];
    ext.extend(be(sni.len() + 2));
    ext.extend(be(sni.len()));
    ext.extend(sni);
    let mut body = vec![3, 3];
    body.extend([7u8; 32]);
    body.extend([0, 0, 2, 0x13, 0x01, 1, 0]);
    body.extend(be(ext.len()));
    body.extend(ext);
    let mut rec = vec![0x16, 3, 1];
    rec.extend(be(body.len() + 4));
    rec.extend([1, 0]);
    rec.extend(be(body.len()));
    rec.extend(body);
    rec
}

fn tls_hello(addr: &str, name: &str) -> Res {
    let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    c.set_read_timeout(Some(Duration::from_secs(8)))
        .map_err(|e| e.to_string())?;
    c.write_all(&client_hello(name))
        .map_err(|e| format!("write: {e}"))?;
    let mut got = String::new();
    let _ = c.read_to_string(&mut got);
    let got = got.trim();
    println!("{}", if got.is_empty() { "closed" } else { got });
    Ok(())
}
