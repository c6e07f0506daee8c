//! The `tracing` event a lenient server `DeadlineLayer` ignores a malformed timeout header with, seen by a
//! subscriber that records every event.
//!
//! A test binary of its own: `tracing` caches each callsite's interest for the whole process, and another test
//! reaching the same event on another thread while this one installs its subscriber can leave it cached as
//! "never", which hides the event from this test. Inside `tests/deadline.rs`, run with 16 test threads, the test
//! missed the event in 8 runs of 300.
#![cfg(feature = "http")]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt;
use std::sync::{Arc, Mutex};

use http::{Request, Response, StatusCode};
use tower::{service_fn, Layer, ServiceExt};
use tower_backpressure::deadline::codec::{decode_grpc_timeout, decode_timeout_ms};
use tower_backpressure::deadline::{DeadlineLayer, GRPC_TIMEOUT_HEADER, TIMEOUT_MS_HEADER};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata, Subscriber};

/// A field's value as an event recorded it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Value {
    Str(String),
    Bool(bool),
    /// Any other value, as its `Debug` output (for a field written with `%`, its `Display` output).
    Other(String),
}

/// One event: its target, its level and its fields by name.
#[derive(Debug)]
struct Recorded {
    target: String,
    level: Level,
    fields: BTreeMap<&'static str, Value>,
}

impl Visit for Recorded {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.fields
            .insert(field.name(), Value::Str(value.to_owned()));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.fields.insert(field.name(), Value::Bool(value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.fields
            .insert(field.name(), Value::Other(format!("{value:?}")));
    }
}

/// A subscriber that is interested in every callsite at every level and records every event. Spans are not
/// recorded; each gets the same id.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<Recorded>>>);

impl Recorder {
    /// The events recorded since the last call.
    fn take(&self) -> Vec<Recorded> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

impl Subscriber for Recorder {
    fn register_callsite(&self, _: &'static Metadata<'static>) -> Interest {
        Interest::always()
    }

    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let metadata = event.metadata();
        let mut recorded = Recorded {
            target: metadata.target().to_owned(),
            level: *metadata.level(),
            fields: BTreeMap::new(),
        };
        event.record(&mut recorded);
        self.0.lock().unwrap().push(recorded);
    }

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}

/// Pairs of a header name and a string: a request's header values, or the error each event must report.
type Pairs<'a> = &'a [(&'a str, &'a str)];

#[tokio::test(start_paused = true)]
async fn a_malformed_header_is_served_and_reported_with_a_debug_event() {
    let recorder = Recorder::default();
    // The test runs on one thread, so the subscriber set for it sees every event the layer emits.
    let _guard = tracing::subscriber::set_default(recorder.clone());
    let svc = DeadlineLayer::builder().build().unwrap().layer(service_fn(
        |_req: Request<String>| async { Ok::<_, Infallible>(Response::new(String::from("done"))) },
    ));

    let grpc_error = decode_grpc_timeout(b"123X").unwrap_err().to_string();
    let ms_error = decode_timeout_ms(b"soon").unwrap_err().to_string();
    // Each request's headers, and the header and error each event must report, one event per malformed header.
    let cases: [(Pairs<'_>, Pairs<'_>); 4] = [
        (
            &[(GRPC_TIMEOUT_HEADER, "123X")],
            &[(GRPC_TIMEOUT_HEADER, &grpc_error)],
        ),
        (
            &[(TIMEOUT_MS_HEADER, "soon")],
            &[(TIMEOUT_MS_HEADER, &ms_error)],
        ),
        (
            &[(GRPC_TIMEOUT_HEADER, "123X"), (TIMEOUT_MS_HEADER, "soon")],
            &[
                (GRPC_TIMEOUT_HEADER, &grpc_error),
                (TIMEOUT_MS_HEADER, &ms_error),
            ],
        ),
        (
            &[(GRPC_TIMEOUT_HEADER, "3S"), (TIMEOUT_MS_HEADER, "1000")],
            &[],
        ),
    ];
    for (headers, expected) in cases {
        let mut builder = Request::builder().uri("/");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let response = svc
            .clone()
            .oneshot(builder.body(String::new()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{headers:?}");
        assert_eq!(response.into_body(), "done", "{headers:?}");

        let mut events = recorder.take();
        events.sort_by(|a, b| a.fields.get("header").cmp(&b.fields.get("header")));
        let mut expected = expected.to_vec();
        expected.sort();
        assert_eq!(events.len(), expected.len(), "{headers:?}: {events:?}");
        for (event, (header, error)) in events.iter().zip(expected) {
            assert_eq!(event.target, "tower_backpressure", "{event:?}");
            assert_eq!(event.level, Level::DEBUG, "{event:?}");
            let field = |name| event.fields.get(name);
            assert_eq!(
                field("header"),
                Some(&Value::Str(header.into())),
                "{event:?}"
            );
            assert_eq!(field("strict"), Some(&Value::Bool(false)), "{event:?}");
            assert_eq!(
                field("layer"),
                Some(&Value::Str("deadline".into())),
                "{event:?}"
            );
            assert_eq!(
                field("error"),
                Some(&Value::Other(error.into())),
                "{event:?}"
            );
        }
    }
}
