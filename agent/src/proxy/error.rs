//! The answers the proxy makes itself. Every one has a [`Reason`]: its status, the
//! `x-weft-reason` value that tells an operator the answer came from the mesh and why, the
//! counter it raises, and whose fault it was. [`ProxyError::respond`] is the one place such
//! a response is built; docs/traffic.md's table is kept equal to [`Reason::ALL`] by a test.

use std::sync::atomic::AtomicU64;

use bytes::Bytes;
use hyper::{
    header::{HeaderValue, CONNECTION, LOCATION, RETRY_AFTER},
    Response, StatusCode,
};

use super::http::body::{full, Body};
use crate::metrics::Metrics;

/// The header on every response the proxy makes itself.
pub const REASON_HEADER: &str = "x-weft-reason";

/// Whose doing an answer is: only [`Blame::Upstream`] answers may count against an
/// endpoint's health (latency estimate, outlier detection).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blame {
    /// The client sent something broken or too slowly.
    Client,
    /// A rule or policy said so (routes, limits, faults, redirects).
    Policy,
    /// The endpoint failed or was too slow.
    Upstream,
}

macro_rules! reasons {
    ($( $variant:ident = ($status:expr, $text:literal, $blame:ident) ),* $(,)?) => {
        /// Why the proxy answered a request itself.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Reason { $( $variant, )* }

        impl Reason {
            pub const ALL: &'static [Reason] = &[ $( Reason::$variant, )* ];

            /// The `x-weft-reason` value.
            pub const fn as_str(self) -> &'static str {
                match self { $( Reason::$variant => $text, )* }
            }

            /// The status it answers with (a fault or redirect may say another).
            pub const fn status(self) -> StatusCode {
                match self { $( Reason::$variant => $status, )* }
            }

            pub const fn blame(self) -> Blame {
                match self { $( Reason::$variant => Blame::$blame, )* }
            }
        }
    };
}

reasons! {
    NoRoute = (StatusCode::NOT_FOUND, "no-route", Policy),
    NoBackend = (StatusCode::SERVICE_UNAVAILABLE, "no-backend", Policy),
    BackendNotFound = (StatusCode::INTERNAL_SERVER_ERROR, "backend-not-found", Policy),
    NoHealthyEndpoint = (StatusCode::SERVICE_UNAVAILABLE, "no-healthy-endpoint", Upstream),
    UpstreamConnectFailed = (StatusCode::SERVICE_UNAVAILABLE, "upstream-connect-failed", Upstream),
    UpstreamError = (StatusCode::BAD_GATEWAY, "upstream-error", Upstream),
    BackendTimeout = (StatusCode::GATEWAY_TIMEOUT, "backend-timeout", Upstream),
    RequestTimeout = (StatusCode::GATEWAY_TIMEOUT, "request-timeout", Upstream),
    CircuitOpenRequests = (StatusCode::SERVICE_UNAVAILABLE, "circuit-open-requests", Policy),
    CircuitOpenConnections = (StatusCode::SERVICE_UNAVAILABLE, "circuit-open-connections", Policy),
    RateLimited = (StatusCode::TOO_MANY_REQUESTS, "rate-limited", Policy),
    FaultInjected = (StatusCode::SERVICE_UNAVAILABLE, "fault-injected", Policy),
    Redirect = (StatusCode::FOUND, "redirect", Policy),
    PolicyDenied = (StatusCode::FORBIDDEN, "policy-denied", Policy),
    ConflictingFraming = (StatusCode::BAD_REQUEST, "conflicting-framing", Client),
    BadRequestBody = (StatusCode::BAD_REQUEST, "bad-request-body", Client),
    RequestBodyTimeout = (StatusCode::REQUEST_TIMEOUT, "request-body-timeout", Client),
}

impl Reason {
    /// The counter an answer for this reason raises besides `http_proxy_answers`.
    pub fn counter(self, m: &Metrics) -> Option<&AtomicU64> {
        Some(match self {
            Self::CircuitOpenRequests | Self::CircuitOpenConnections => &m.http_circuit_open,
            Self::RateLimited => &m.http_rate_limited,
            Self::FaultInjected => &m.http_faults,
            Self::PolicyDenied => &m.policy_denied,
            Self::ConflictingFraming | Self::BadRequestBody | Self::RequestBodyTimeout => {
                &m.http_client_errors
            }
            _ => return None,
        })
    }

    /// After these the client's connection cannot be trusted to be in step: close it.
    pub fn closes_connection(self) -> bool {
        matches!(
            self,
            Self::ConflictingFraming | Self::BadRequestBody | Self::RequestBodyTimeout
        )
    }
}

/// An answer the proxy makes instead of the app's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyError {
    pub reason: Reason,
    /// A status other than the reason's own (a configured fault or redirect).
    pub status: Option<StatusCode>,
    /// Where a redirect points.
    pub location: Option<HeaderValue>,
}

impl From<Reason> for ProxyError {
    fn from(reason: Reason) -> Self {
        Self {
            reason,
            status: None,
            location: None,
        }
    }
}

impl ProxyError {
    pub fn with_status(reason: Reason, status: StatusCode) -> Self {
        Self {
            status: Some(status),
            ..reason.into()
        }
    }

    pub fn status(&self) -> StatusCode {
        self.status.unwrap_or(self.reason.status())
    }

    /// The response, with its counters raised: the one place a proxy answer is made.
    pub fn respond(self, m: &Metrics) -> Response<Body> {
        Metrics::inc(&m.http_proxy_answers);
        if let Some(c) = self.reason.counter(m) {
            Metrics::inc(c);
        }
        let reason = self.reason.as_str();
        let mut r = Response::new(full(Bytes::from(format!("weft: {reason}\n"))));
        *r.status_mut() = self.status();
        let h = r.headers_mut();
        h.insert(REASON_HEADER, HeaderValue::from_static(reason));
        match self.reason {
            Reason::RateLimited => {
                h.insert(RETRY_AFTER, HeaderValue::from_static("1"));
            }
            r if r.closes_connection() => {
                h.insert(CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        if let Some(l) = self.location {
            h.insert(LOCATION, l);
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/traffic.md's table of proxy answers is exactly [`Reason::ALL`], with statuses.
    #[test]
    fn the_traffic_reference_lists_every_reason() {
        let doc = include_str!("../../../docs/traffic.md");
        let rows: Vec<(String, String)> = doc
            .lines()
            .filter_map(|l| {
                let cells: Vec<&str> = l.split('|').map(str::trim).collect();
                let reason = cells.get(2)?.strip_prefix('`')?.strip_suffix('`')?;
                Reason::ALL
                    .iter()
                    .any(|r| r.as_str() == reason)
                    .then(|| (cells[1].to_owned(), reason.to_owned()))
            })
            .collect();
        let listed: Vec<&str> = rows.iter().map(|(_, r)| r.as_str()).collect();
        let all: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        let mut a = listed.clone();
        a.sort_unstable();
        let mut b = all.clone();
        b.sort_unstable();
        assert_eq!(
            a, b,
            "docs/traffic.md's reason table and Reason::ALL differ"
        );
        for (status, reason) in &rows {
            let r = Reason::ALL.iter().find(|r| r.as_str() == reason).unwrap();
            let configurable = matches!(r, Reason::FaultInjected | Reason::Redirect);
            if !configurable {
                assert_eq!(
                    status,
                    &r.status().as_u16().to_string(),
                    "status of {reason} in docs/traffic.md"
                );
            }
        }
    }

    #[test]
    fn an_answer_says_why_and_counts() {
        let m = Metrics::default();
        let r = ProxyError::from(Reason::BadRequestBody).respond(&m);
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert_eq!(r.headers()[REASON_HEADER], "bad-request-body");
        assert_eq!(r.headers()[CONNECTION], "close");
        assert_eq!(
            m.http_client_errors
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        assert_eq!(
            m.http_proxy_answers
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        let r = ProxyError::with_status(Reason::FaultInjected, StatusCode::IM_A_TEAPOT).respond(&m);
        assert_eq!(r.status(), StatusCode::IM_A_TEAPOT);
    }
}
