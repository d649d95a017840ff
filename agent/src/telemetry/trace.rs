//! Distributed tracing: W3C trace context (`traceparent`, `tracestate`) taken from each
//! request, or a new trace started when it has none; a span for the request's way through
//! the agent and a child span per attempt at an endpoint (so retries share one trace),
//! the attempt's context passed upstream in `traceparent`; spans exported over OTLP/HTTP
//! (protobuf) by OpenTelemetry's SDK, batched off the request path. Off unless
//! `--otlp-endpoint` is given; sampled per trace (`--trace-sample`, parent-based: a
//! client's sampling decision is kept).

use std::time::Duration;

use hyper::HeaderMap;
use opentelemetry::{
    propagation::TextMapPropagator as _,
    trace::{SpanKind, Status, TraceContextExt as _, Tracer as _, TracerProvider as _},
    Context, KeyValue,
};
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_otlp::{Protocol, WithExportConfig as _};
use opentelemetry_sdk::{
    propagation::TraceContextPropagator,
    trace::{BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider},
    Resource,
};

/// Where spans go and how many traces are kept.
#[derive(Clone, Debug)]
pub struct TraceOptions {
    /// The collector's OTLP/HTTP address, `http://HOST:4318` (`/v1/traces` is added when
    /// no path is given).
    pub endpoint: String,
    /// The share of new traces recorded (0 to 1); a client's decision is kept.
    pub sample: f64,
    /// This agent's node, on every span.
    pub node: String,
}

/// The agent's tracer.
pub struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
}

impl std::fmt::Debug for Tracing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tracing")
    }
}

/// The endpoint with the traces path when none is given.
fn traces_url(endpoint: &str) -> String {
    let trimmed = endpoint.trim_end_matches('/');
    let has_path = trimmed
        .split_once("://")
        .map_or(trimmed, |(_, rest)| rest)
        .contains('/');
    if has_path {
        endpoint.to_owned()
    } else {
        format!("{trimmed}/v1/traces")
    }
}

impl Tracing {
    /// Build the exporter and the tracer; fails on an endpoint that is not a URL.
    pub fn start(o: &TraceOptions) -> Result<Self, String> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(traces_url(&o.endpoint))
            .with_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| format!("--otlp-endpoint {}: {e}", o.endpoint))?;
        // Spans wait at most a second, at most 8,192 of them (more are dropped by the
        // SDK): a slow or absent collector never holds up a request.
        let batch = BatchSpanProcessor::builder(exporter)
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_scheduled_delay(Duration::from_secs(1))
                    .with_max_queue_size(8192)
                    .build(),
            )
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(batch)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                o.sample.clamp(0.0, 1.0),
            ))))
            .with_resource(
                Resource::builder()
                    .with_service_name("weft-agent")
                    .with_attribute(KeyValue::new("weft.node", o.node.clone()))
                    .build(),
            )
            .build();
        let tracer = provider.tracer("weft");
        Ok(Self {
            provider,
            tracer,
            propagator: TraceContextPropagator::new(),
        })
    }

    /// The span of one request through the agent, a child of the client's context when
    /// its headers carry one (else the root of a new trace).
    pub fn request_span(&self, headers: &HeaderMap, name: String, attrs: Vec<KeyValue>) -> Context {
        let parent = self.propagator.extract(&HeaderExtractor(headers));
        let span = self
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Server)
            .with_attributes(attrs)
            .start_with_context(&self.tracer, &parent);
        parent.with_span(span)
    }

    /// The span of one attempt at an endpoint, a child of the request's; its context
    /// replaces the request's `traceparent` (and keeps `tracestate`) in `headers`.
    pub fn attempt_span(
        &self,
        request: &Context,
        headers: &mut HeaderMap,
        attrs: Vec<KeyValue>,
    ) -> Context {
        let span = self
            .tracer
            .span_builder("weft attempt")
            .with_kind(SpanKind::Client)
            .with_attributes(attrs)
            .start_with_context(&self.tracer, request);
        let cx = request.with_span(span);
        self.propagator
            .inject_context(&cx, &mut HeaderInjector(headers));
        cx
    }

    /// Send what is batched and stop (at the agent's exit).
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "flushing the last spans failed");
        }
    }
}

/// End `cx`'s span with the response's status (an error from 500 on, or when the proxy
/// answered for a reason).
pub fn end(cx: &Context, status: u16, reason: Option<&'static str>, extra: Vec<KeyValue>) {
    let span = cx.span();
    span.set_attribute(KeyValue::new(
        "http.response.status_code",
        i64::from(status),
    ));
    if let Some(r) = reason {
        span.set_attribute(KeyValue::new("weft.reason", r));
    }
    for kv in extra {
        span.set_attribute(kv);
    }
    if status >= 500 {
        span.set_status(Status::error(reason.unwrap_or("server error")));
    }
    span.end();
}

/// The trace id of `cx`, as hex (what access log lines carry).
pub fn trace_id(cx: &Context) -> String {
    cx.span().span_context().trace_id().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_traces_path_is_added_only_when_missing() {
        assert_eq!(traces_url("http://c:4318"), "http://c:4318/v1/traces");
        assert_eq!(traces_url("http://c:4318/"), "http://c:4318/v1/traces");
        assert_eq!(
            traces_url("http://c:4318/custom/path"),
            "http://c:4318/custom/path"
        );
    }
}
