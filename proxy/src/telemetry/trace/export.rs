//! Span export: from the data path through a bounded in-memory queue to one background
//! task per exporter, which posts batches to its collector, as Zipkin v2 JSON
//! (`[proxy] zipkin_url`, [`super::zipkin`]) or OTLP/HTTP protobuf (`[proxy] otlp_url`,
//! [`super::otlp`]); either or both. A batch the collector does not take for now
//! (unreachable, 5xx, 429, no answer within the timeout) is kept in the exporter's disk
//! queue ([`super::queue`], `<span_queue_dir>/<exporter>/`) and sent again, oldest first,
//! with exponential backoff and jitter, when the collector is back.
//!
//! Invariants:
//! - The data path never waits: [`SpanSink::submit`] is a `try_send` per exporter; when an
//!   exporter's queue is full (or its task is gone) the span is dropped for that exporter
//!   and counted (`dropped`, reason `queue_full`).
//! - Every span that entered an exporter's queue is counted exactly once in the end, in
//!   spans, not batches ([`super::SpanCounters`]): `exported` (the collector answered 2xx,
//!   at once or from the disk queue), `failed` (refused: a 4xx other than 429, the spans
//!   an OTLP collector's 2xx answer says it rejected (`partial_success`), or it could
//!   not be encoded: never retried), or `dropped` (`disk_full`: the disk queue's oldest
//!   batch made room for a newer one, or a batch larger than the bound; `corrupt`: its
//!   file did not read back as written; `not_kept`: it could not be kept on disk). Until
//!   then it is in memory or on disk (`queued`). `kept` counts those that went to disk.
//! - While the collector is failing (a retry is pending), new batches go to the disk
//!   queue without a request of their own: one request per backoff step probes the
//!   collector with the oldest batch. A success sends the rest back to back.
//! - A collector that accepts the connection and never answers holds one batch for at
//!   most `timeout`; the batch is then kept for a retry.
//! - Disk I/O runs on tokio's blocking threads, never on the runtime's own.
//! - One exporter task per format at a time holds the disk queue: a replaced exporter
//!   (its URL or queue changed) ends, after posting or keeping what it holds, before its
//!   successor opens the folder; the data path's handles ([`SpanSink`]) share one cell,
//!   so every route table, old or new, feeds the exporters in use.
//! - Warnings about a failing collector are logged at most once per `warn_interval` per
//!   exporter (the others are counted in the next warning's `suppressed`).

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::uri::InvalidUri;
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use pimesh_runtime::backoff::{Backoff, Jitter, Retry};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::finished::FinishedSpan;
use super::queue::{DiskQueue, Oldest};
use super::{otlp, zipkin, ExporterCounters, SpanCounters};

/// Tuning of an exporter; [`Settings::default`] holds the production values.
#[derive(Clone, Copy, Debug)]
pub(super) struct Settings {
    /// Spans waiting for the exporter; more are dropped.
    pub queue_capacity: usize,
    /// A batch is posted as soon as it holds this many spans...
    pub batch_size: usize,
    /// ...or at this interval, whichever comes first.
    pub flush_interval: Duration,
    /// The whole exchange with the collector (connect, request, response body).
    pub timeout: Duration,
    /// At most one warning about a failing collector per interval.
    pub warn_interval: Duration,
    /// The pauses between attempts to send the disk queue's oldest batch while the
    /// collector fails.
    pub retry: Backoff,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            queue_capacity: 1024,
            batch_size: 100,
            flush_interval: Duration::from_secs(1),
            timeout: Duration::from_secs(5),
            warn_interval: Duration::from_secs(10),
            // 1 s doubling to a minute, in the upper half: a collector that restarts is
            // found within a minute, a site's proxies do not return in lock-step.
            retry: Backoff::new(Duration::from_secs(1), Duration::from_secs(60))
                .with_jitter(Jitter::HALF),
        }
    }
}

/// The wire format of an exporter, and so its config key, label and queue folder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Format {
    /// Zipkin v2 JSON (`[proxy] zipkin_url`).
    Zipkin,
    /// OTLP/HTTP protobuf (`[proxy] otlp_url`).
    Otlp,
}

impl Format {
    /// The `exporter` label, and the name of its folder in the queue directory.
    pub fn label(self) -> &'static str {
        match self {
            Format::Zipkin => "zipkin",
            Format::Otlp => "otlp",
        }
    }

    /// The site config key of its URL.
    fn key(self) -> &'static str {
        match self {
            Format::Zipkin => "proxy.zipkin_url",
            Format::Otlp => "proxy.otlp_url",
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            Format::Zipkin => "application/json",
            Format::Otlp => "application/x-protobuf",
        }
    }

    /// `batch` as a request body; `node` names this proxy's node.
    /// The spans a collector's 2xx `answer` says it rejected, and why: OTLP's
    /// `partial_success` (an answer that does not decode rejects nothing); Zipkin has no
    /// such answer.
    fn rejected(self, answer: &[u8]) -> Option<(u64, String)> {
        match self {
            Format::Zipkin => None,
            Format::Otlp => otlp::rejected(answer),
        }
    }

    fn encode(self, batch: &[FinishedSpan], node: &str) -> Result<Vec<u8>, String> {
        match self {
            Format::Zipkin => zipkin::encode(batch, &format!("{}.{node}", otlp::SERVICE_NAME))
                .map_err(|err| err.to_string()),
            Format::Otlp => Ok(otlp::encode(batch, node)),
        }
    }
}

/// Why no exporter was started for a collector URL; shown as one line naming the URL.
#[derive(Debug)]
pub enum SinkError {
    /// The URL has no `http://` scheme.
    NoScheme {
        url: String,
    },
    Invalid {
        url: String,
        err: InvalidUri,
    },
    /// A scheme other than `http`.
    Scheme {
        url: String,
        scheme: String,
    },
    NoHost {
        url: String,
    },
    /// The URL carries credentials (`user:password@`).
    Credentials {
        url: String,
    },
    /// Not called on a tokio runtime.
    NoRuntime {
        url: String,
    },
}

impl fmt::Display for SinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SinkError::NoScheme { url } => {
                write!(f, "span collector URL {url:?} must start with http://")
            }
            SinkError::Invalid { url, err } => {
                write!(f, "span collector URL {url:?} is not a valid URL: {err}")
            }
            SinkError::Scheme { url, scheme } => write!(
                f,
                "span collector URL {url:?} uses {scheme}://; only http:// is supported"
            ),
            SinkError::NoHost { url } => write!(f, "span collector URL {url:?} has no host"),
            SinkError::Credentials { url } => write!(
                f,
                "span collector URL {url:?} carries credentials, which are not supported"
            ),
            SinkError::NoRuntime { url } => {
                write!(f, "cannot export spans to {url:?}: no tokio runtime")
            }
        }
    }
}

impl std::error::Error for SinkError {}

/// The most of a collector's answer read: an OTLP answer with a `partial_success` is a
/// few hundred bytes.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Why a batch of spans was not exported.
#[derive(Debug)]
enum BatchError {
    Encode(String),
    Build(http::Error),
    Send(hyper_util::client::legacy::Error),
    Body(hyper::Error),
    /// The collector answered a status other than 2xx.
    Status(StatusCode),
    /// No answer within the exporter's timeout.
    Timeout(Duration),
    /// A 2xx answer that rejects some of the spans (OTLP `partial_success`), with the
    /// collector's reason.
    Rejected(String),
}

impl BatchError {
    /// Whether the same batch may succeed later: the collector could not be reached or
    /// did not answer, was overloaded (429) or failed (5xx). Anything else is a refusal
    /// of this batch, which a retry would only repeat.
    fn is_transient(&self) -> bool {
        match self {
            BatchError::Send(_) | BatchError::Body(_) | BatchError::Timeout(_) => true,
            BatchError::Status(status) => {
                *status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
            }
            BatchError::Encode(_) | BatchError::Build(_) | BatchError::Rejected(_) => false,
        }
    }
}

impl fmt::Display for BatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BatchError::Encode(err) => write!(f, "cannot encode the spans: {err}"),
            BatchError::Build(err) => write!(f, "cannot build the request: {err}"),
            BatchError::Send(err) => f.write_str(&pimesh_runtime::error_chain(err)),
            BatchError::Body(err) => f.write_str(&pimesh_runtime::error_chain(err)),
            BatchError::Status(status) => write!(f, "the collector answered {status}"),
            BatchError::Timeout(limit) => {
                write!(f, "no answer within {} s", limit.as_secs_f64())
            }
            BatchError::Rejected(reason) => {
                write!(f, "the collector rejected spans: {reason:?}")
            }
        }
    }
}

/// One exporter's end of the data path: its queue and its `queue_full` counter.
#[derive(Clone, Debug)]
struct Feed {
    queue: mpsc::Sender<FinishedSpan>,
    dropped: prometheus_client::metrics::counter::Counter,
}

/// The data path's handle on the exporters in use; cheap to clone (one `Arc`). Every
/// clone sees the exporters [`CollectorSink`] last set, whichever route table holds it.
#[derive(Clone, Debug)]
pub struct SpanSink {
    feeds: Arc<RwLock<Vec<Feed>>>,
}

impl SpanSink {
    /// Queues `span` for every exporter without waiting; for an exporter whose queue is
    /// full (or that is gone) it is dropped and counted.
    pub(super) fn submit(&self, span: FinishedSpan) {
        let feeds = self.feeds.read().unwrap_or_else(PoisonError::into_inner);
        let Some((last, others)) = feeds.split_last() else {
            return;
        };
        for feed in others {
            if feed.queue.try_send(span.clone()).is_err() {
                feed.dropped.inc();
            }
        }
        if last.queue.try_send(span).is_err() {
            last.dropped.inc();
        }
    }
}

/// Where the disk queue of each exporter lives, and its bound.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct QueueSpec {
    /// The exporter's own folder (`<span_queue_dir>/<exporter>`).
    pub dir: PathBuf,
    pub max_bytes: u64,
}

/// What [`CollectorSink::update`] exports to, from the site config's `[proxy]` table and
/// the proxy's state directory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExportSettings {
    pub zipkin_url: Option<String>,
    pub otlp_url: Option<String>,
    /// The folder holding each exporter's disk queue.
    pub queue_dir: PathBuf,
    /// The bound of all disk queues together; 0: none.
    pub queue_max_bytes: u64,
}

/// One exporter as started: what it was started for, and its task.
struct Running {
    url: String,
    queue: Option<QueueSpec>,
    feed: Feed,
    task: JoinHandle<()>,
}

/// One format's exporter, if any, and those it replaced that may still be ending.
#[derive(Default)]
struct Slot {
    running: Option<Running>,
    /// Replaced (or stopped) exporters of this format not yet awaited by a successor.
    retired: Vec<JoinHandle<()>>,
}

/// The exporters for the configured collector URLs: each started when its URL is set,
/// restarted only when its URL or disk queue changes; none while no URL is set or the one
/// set is refused (logged with its key).
#[derive(Default)]
pub struct CollectorSink {
    feeds: Arc<RwLock<Vec<Feed>>>,
    zipkin: Slot,
    otlp: Slot,
    settings: Settings,
}

impl CollectorSink {
    /// The sink for `settings`, `None` when no exporter runs. `node`, asked only when an
    /// exporter starts, names this proxy's node in its spans.
    pub fn update(
        &mut self,
        settings: &ExportSettings,
        node: impl FnOnce() -> String,
        counters: &SpanCounters,
    ) -> Option<SpanSink> {
        let wanted = [
            (Format::Zipkin, settings.zipkin_url.as_deref()),
            (Format::Otlp, settings.otlp_url.as_deref()),
        ];
        // The disk bound is shared by the exporters configured.
        let exporters = wanted.iter().filter(|(_, url)| url.is_some()).count() as u64;
        let mut node = Some(node);
        let mut node_name = None::<String>;
        let mut changed = false;
        for (format, url) in wanted {
            let queue = (settings.queue_max_bytes > 0 && exporters > 0).then(|| QueueSpec {
                dir: settings.queue_dir.join(format.label()),
                max_bytes: settings.queue_max_bytes / exporters,
            });
            let slot = match format {
                Format::Zipkin => &mut self.zipkin,
                Format::Otlp => &mut self.otlp,
            };
            let same = match (&slot.running, url) {
                (Some(running), Some(url)) => running.url == url && running.queue == queue,
                (None, None) => true,
                _ => false,
            };
            if same {
                continue;
            }
            changed = true;
            if let Some(previous) = slot.running.take() {
                // Its successor waits for it to let go of its folder.
                slot.retired.push(previous.task);
            }
            slot.retired.retain(|task| !task.is_finished());
            let Some(url) = url else {
                continue;
            };
            let name = node_name
                .get_or_insert_with(|| node.take().map_or_else(String::new, |node| node()))
                .clone();
            match spawn(
                format,
                url,
                name,
                counters.exporter(format.label()),
                self.settings,
                queue.clone(),
                std::mem::take(&mut slot.retired),
            ) {
                Ok((feed, task)) => {
                    slot.running = Some(Running {
                        url: url.to_owned(),
                        queue,
                        feed,
                        task,
                    });
                }
                Err((err, waits)) => {
                    slot.retired = waits;
                    warn!(key = format.key(), error = %err, "spans will not be exported there");
                }
            }
        }
        if changed {
            let feeds: Vec<Feed> = [&self.zipkin, &self.otlp]
                .into_iter()
                .filter_map(|slot| slot.running.as_ref())
                .map(|running| running.feed.clone())
                .collect();
            // Dropping the old feeds closes the replaced exporters' queues: they end.
            *self.feeds.write().unwrap_or_else(PoisonError::into_inner) = feeds;
        }
        let any = self.zipkin.running.is_some() || self.otlp.running.is_some();
        any.then(|| SpanSink {
            feeds: Arc::clone(&self.feeds),
        })
    }
}

/// Starts an exporter on the current runtime once the tasks in `waits` have ended (an
/// exporter it replaces, holding its folder). Err gives `waits` back.
#[allow(clippy::type_complexity)]
fn spawn(
    format: Format,
    url: &str,
    node: String,
    counters: ExporterCounters,
    settings: Settings,
    queue: Option<QueueSpec>,
    waits: Vec<JoinHandle<()>>,
) -> Result<(Feed, JoinHandle<()>), (SinkError, Vec<JoinHandle<()>>)> {
    let uri = match collector_uri(url) {
        Ok(uri) => uri,
        Err(err) => return Err((err, waits)),
    };
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        let err = SinkError::NoRuntime {
            url: url.to_owned(),
        };
        return Err((err, waits));
    };
    let (sender, receiver) = mpsc::channel(settings.queue_capacity.max(1));
    let feed = Feed {
        queue: sender,
        dropped: counters.dropped_queue_full.clone(),
    };
    let exporter = Exporter {
        format,
        client: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
        uri,
        node,
        retry: Retry::new(settings.retry),
        counters,
        settings,
        queue_spec: queue,
        queue: None,
        next_attempt: None,
        last_warning: None,
        suppressed: 0,
    };
    let task = runtime.spawn(async move {
        for previous in waits {
            let _ = previous.await;
        }
        exporter.run(receiver).await;
    });
    Ok((feed, task))
}

/// Test access: one exporter and its sink, outside a [`CollectorSink`].
#[cfg(test)]
pub(super) fn spawn_for_test(
    format: Format,
    url: &str,
    counters: ExporterCounters,
    settings: Settings,
    queue: Option<QueueSpec>,
) -> Result<(SpanSink, JoinHandle<()>), SinkError> {
    let (feed, task) = spawn(
        format,
        url,
        "node-a".into(),
        counters,
        settings,
        queue,
        Vec::new(),
    )
    .map_err(|(err, _)| err)?;
    let sink = SpanSink {
        feeds: Arc::new(RwLock::new(vec![feed])),
    };
    Ok((sink, task))
}

/// Checks the collector URL: `http://host[:port][/path]`, no credentials.
fn collector_uri(url: &str) -> Result<Uri, SinkError> {
    let url_owned = || url.to_owned();
    if !url.contains("://") {
        return Err(SinkError::NoScheme { url: url_owned() });
    }
    let uri: Uri = url.parse().map_err(|err| SinkError::Invalid {
        url: url_owned(),
        err,
    })?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => {
            return Err(SinkError::Scheme {
                url: url_owned(),
                scheme: other.to_owned(),
            })
        }
        None => return Err(SinkError::NoScheme { url: url_owned() }),
    }
    let Some(authority) = uri.authority() else {
        return Err(SinkError::NoHost { url: url_owned() });
    };
    if authority.as_str().contains('@') {
        return Err(SinkError::Credentials { url: url_owned() });
    }
    if authority.host().is_empty() {
        return Err(SinkError::NoHost { url: url_owned() });
    }
    Ok(uri)
}

struct Exporter {
    format: Format,
    client: Client<HttpConnector, Full<Bytes>>,
    uri: Uri,
    node: String,
    counters: ExporterCounters,
    settings: Settings,
    /// Failures of the collector in a row; above 0, new batches go to disk directly.
    retry: Retry,
    /// `None`: nothing is ever kept on disk.
    queue_spec: Option<QueueSpec>,
    /// Open once a batch had to be kept, or at the start when the folder exists.
    queue: Option<DiskQueue>,
    /// When to send the disk queue's oldest batch; `None` while it is empty.
    next_attempt: Option<tokio::time::Instant>,
    last_warning: Option<Instant>,
    /// Warnings not logged since the last one.
    suppressed: u64,
}

impl Exporter {
    async fn run(mut self, mut queue: mpsc::Receiver<FinishedSpan>) {
        // Batches a previous process (or exporter) left are sent first.
        self.open_queue(false).await;
        self.schedule_now_if_queued();
        let batch_size = self.settings.batch_size.max(1);
        let mut batch = Vec::with_capacity(batch_size);
        let mut tick = tokio::time::interval(self.settings.flush_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let room = batch_size - batch.len();
            let next_attempt = self.next_attempt;
            tokio::select! {
                received = queue.recv_many(&mut batch, room) => {
                    if received == 0 {
                        // Every sink is gone (recv_many only returns 0 when closed).
                        if !batch.is_empty() {
                            self.flush(&mut batch).await;
                        }
                        debug!(exporter = self.format.label(), collector = %self.uri, "span exporter stopped");
                        return;
                    }
                    if batch.len() >= batch_size {
                        self.flush(&mut batch).await;
                    }
                }
                _ = tick.tick() => {
                    if !batch.is_empty() {
                        self.flush(&mut batch).await;
                    }
                }
                () = sleep_until(next_attempt), if next_attempt.is_some() => {
                    self.resend_oldest().await;
                }
            }
        }
    }

    /// Posts `batch` (or keeps it on disk while the collector is failing) and empties it.
    async fn flush(&mut self, batch: &mut Vec<FinishedSpan>) {
        let spans = batch.len() as u64;
        let encoded = self.format.encode(batch, &self.node);
        batch.clear();
        let body = match encoded {
            Ok(body) => Bytes::from(body),
            Err(err) => {
                self.counters.failed.inc_by(spans);
                self.warn(&BatchError::Encode(err), spans, "dropped the batch");
                return;
            }
        };
        if self.retry.failures() > 0 && self.queue.is_some() {
            // The collector is failing: the oldest batch on disk probes it at the next
            // attempt; this one waits its turn behind it.
            self.keep(body, spans).await;
            return;
        }
        match self.post(body.clone()).await {
            Ok(answer) => {
                self.delivered(spans, &answer);
                self.succeeded();
            }
            Err(reason) if reason.is_transient() => {
                let kept = self.keep(body, spans).await;
                self.failed_now(&reason, spans, kept);
            }
            Err(reason) => {
                self.counters.failed.inc_by(spans);
                self.warn(
                    &reason,
                    spans,
                    "the collector refused the batch; dropped it",
                );
            }
        }
    }

    /// Sends the disk queue's oldest batch; on success (or a refusal, or a corrupt file)
    /// the next one is due at once, on a transient failure after the next backoff pause.
    async fn resend_oldest(&mut self) {
        let oldest = self.with_queue(DiskQueue::oldest).await.flatten();
        match oldest {
            None => {}
            Some(Oldest::Corrupt { spans, reason }) => {
                self.counters.dropped_corrupt.inc_by(spans);
                self.counters.corrupt_files.inc();
                warn!(
                    exporter = self.format.label(),
                    %reason,
                    spans,
                    "dropped a corrupt batch file of the span queue"
                );
            }
            Some(Oldest::Batch { body, spans }) => match self.post(Bytes::from(body)).await {
                Ok(answer) => {
                    self.with_queue(DiskQueue::remove_oldest).await;
                    self.delivered(spans, &answer);
                    if self.retry.failures() > 0 {
                        info!(
                            exporter = self.format.label(),
                            collector = %self.uri,
                            queued = self.queue.as_ref().map_or(0, DiskQueue::spans),
                            "the span collector is back; sending the spans kept"
                        );
                    }
                    self.retry.reset();
                }
                Err(reason) if reason.is_transient() => {
                    self.failed_now(&reason, spans, true);
                    self.update_gauge();
                    return;
                }
                Err(reason) => {
                    self.with_queue(DiskQueue::remove_oldest).await;
                    self.counters.failed.inc_by(spans);
                    self.warn(
                        &reason,
                        spans,
                        "the collector refused a kept batch; dropped it",
                    );
                }
            },
        }
        self.update_gauge();
        self.next_attempt = None;
        self.schedule_now_if_queued();
    }

    /// Counts a batch of `spans` the collector took with the 2xx body `answer`: exported,
    /// but for those an OTLP `partial_success` says it rejected, which are failed (the
    /// collector judged them: a retry would repeat the verdict).
    fn delivered(&mut self, spans: u64, answer: &[u8]) {
        let rejected = self.format.rejected(answer);
        let refused = rejected
            .as_ref()
            .map_or(0, |(count, _)| (*count).min(spans));
        self.counters.exported.inc_by(spans - refused);
        if let (Some((_, reason)), true) = (rejected, refused > 0) {
            self.counters.failed.inc_by(refused);
            self.warn(
                &BatchError::Rejected(reason),
                refused,
                "the collector took the batch but rejected these spans",
            );
        }
    }

    /// After a success: back to sending at once.
    fn succeeded(&mut self) {
        self.retry.reset();
        self.schedule_now_if_queued();
    }

    /// After a transient failure of a batch of `spans` (`kept` on disk or not): the next
    /// attempt waits the next backoff pause.
    fn failed_now(&mut self, reason: &BatchError, spans: u64, kept: bool) {
        let pause = self.retry.next_delay(fastrand::u64(..));
        if self.queue.as_ref().is_some_and(|queue| !queue.is_empty()) {
            self.next_attempt = Some(tokio::time::Instant::now() + pause);
        }
        let what = if kept {
            "kept the batch on disk for a retry"
        } else {
            "could not keep the batch; dropped it"
        };
        self.warn(reason, spans, what);
    }

    fn schedule_now_if_queued(&mut self) {
        if self.next_attempt.is_none() && self.queue.as_ref().is_some_and(|q| !q.is_empty()) {
            self.next_attempt = Some(tokio::time::Instant::now());
        }
    }

    /// Writes the batch to the disk queue; counts it `kept`, or dropped when it cannot
    /// be. Whether it is on disk.
    async fn keep(&mut self, body: Bytes, spans: u64) -> bool {
        if !self.open_queue(true).await {
            self.counters.dropped_not_kept.inc_by(spans);
            return false;
        }
        let pushed = self
            .with_queue(move |queue: &mut DiskQueue| queue.push(&body, spans))
            .await;
        let Some(pushed) = pushed else {
            self.counters.dropped_not_kept.inc_by(spans);
            return false;
        };
        self.counters.dropped_disk_full.inc_by(pushed.evicted_spans);
        if pushed.kept {
            self.counters.kept.inc_by(spans);
        } else if let Some(err) = pushed.error {
            self.counters.dropped_not_kept.inc_by(spans);
            self.warn_disk(&err.to_string());
        } else {
            // Larger than the whole bound.
            self.counters.dropped_disk_full.inc_by(spans);
        }
        self.update_gauge();
        if pushed.kept && self.next_attempt.is_none() {
            // A batch kept while no retry was pending (the first failure): retry after
            // the current backoff pause.
            let pause = self
                .settings
                .retry
                .delay(self.retry.failures(), fastrand::u64(..));
            self.next_attempt = Some(tokio::time::Instant::now() + pause);
        }
        pushed.kept
    }

    /// Opens the disk queue unless it is open; with `create` false only when its folder
    /// exists. Whether it is open.
    async fn open_queue(&mut self, create: bool) -> bool {
        if self.queue.is_some() {
            return true;
        }
        let Some(spec) = self.queue_spec.clone() else {
            return false;
        };
        let opened = tokio::task::spawn_blocking(move || {
            if !create && !spec.dir.is_dir() {
                return Ok(None);
            }
            DiskQueue::open(&spec.dir, spec.max_bytes).map(Some)
        })
        .await;
        match opened {
            Ok(Ok(Some((queue, opened)))) => {
                self.counters.corrupt_files.inc_by(opened.corrupt_files);
                if !queue.is_empty() {
                    info!(
                        exporter = self.format.label(),
                        dir = %self.queue_spec.as_ref().map_or_else(String::new, |s| s.dir.display().to_string()),
                        batches = queue.len(),
                        spans = queue.spans(),
                        "found kept spans to send"
                    );
                }
                self.queue = Some(queue);
                self.update_gauge();
                true
            }
            Ok(Ok(None)) => false,
            Ok(Err(err)) => {
                self.warn_disk(&err.to_string());
                false
            }
            Err(err) => {
                self.warn_disk(&err.to_string());
                false
            }
        }
    }

    /// Runs `f` on the open disk queue on a blocking thread; `None` when it is not open
    /// (or the thread panicked, which closes it).
    async fn with_queue<R, F>(&mut self, f: F) -> Option<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut DiskQueue) -> R + Send + 'static,
    {
        let mut queue = self.queue.take()?;
        let done = tokio::task::spawn_blocking(move || {
            let result = f(&mut queue);
            (queue, result)
        })
        .await;
        match done {
            Ok((queue, result)) => {
                self.queue = Some(queue);
                Some(result)
            }
            Err(err) => {
                self.warn_disk(&err.to_string());
                None
            }
        }
    }

    fn update_gauge(&self) {
        let spans = self.queue.as_ref().map_or(0, DiskQueue::spans);
        self.counters
            .queued
            .set(i64::try_from(spans).unwrap_or(i64::MAX));
    }

    /// Posts one batch: the body of a 2xx answer (its first [`MAX_ANSWER_BYTES`]).
    async fn post(&self, body: Bytes) -> Result<Vec<u8>, BatchError> {
        let request = Request::post(self.uri.clone())
            .header(CONTENT_TYPE, self.format.content_type())
            .body(Full::new(body))
            .map_err(BatchError::Build)?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(BatchError::Send)?;
            let status = response.status();
            // Read the answer to its end so that the connection can be reused.
            let mut body = response.into_body();
            let mut answer = Vec::new();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(BatchError::Body)?;
                if let Some(data) = frame.data_ref() {
                    let room = MAX_ANSWER_BYTES.saturating_sub(answer.len());
                    answer.extend_from_slice(&data[..data.len().min(room)]);
                }
            }
            if status.is_success() {
                Ok(answer)
            } else {
                Err(BatchError::Status(status))
            }
        };
        match tokio::time::timeout(self.settings.timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(BatchError::Timeout(self.settings.timeout)),
        }
    }

    fn warn_due(&mut self) -> bool {
        let now = Instant::now();
        let due = self
            .last_warning
            .is_none_or(|last| now.duration_since(last) >= self.settings.warn_interval);
        if due {
            self.last_warning = Some(now);
        } else {
            self.suppressed += 1;
        }
        due
    }

    fn warn(&mut self, reason: &BatchError, spans: u64, what: &'static str) {
        if self.warn_due() {
            // `suppressed`: warnings since the last one that were not logged.
            warn!(
                exporter = self.format.label(),
                collector = %self.uri,
                %reason,
                spans,
                suppressed = self.suppressed,
                "cannot export spans; {what}"
            );
            self.suppressed = 0;
        }
    }

    fn warn_disk(&mut self, error: &str) {
        if self.warn_due() {
            let dir = self
                .queue_spec
                .as_ref()
                .map_or_else(String::new, |spec| spec.dir.display().to_string());
            warn!(
                exporter = self.format.label(),
                %dir,
                %error,
                suppressed = self.suppressed,
                "the span disk queue cannot be used; spans the collector does not take are dropped"
            );
            self.suppressed = 0;
        }
    }
}

/// Sleeps until `at`; forever when `None` (the `select!` branch is disabled then).
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collector_url_checks() {
        assert!(collector_uri("http://zipkin:9411/api/v2/spans").is_ok());
        assert!(collector_uri("http://127.0.0.1:9411").is_ok());
        for (url, what) in [
            ("https://zipkin:9411/api/v2/spans", "only http://"),
            ("zipkin:9411/api/v2/spans", "http://"),
            ("/api/v2/spans", "http://"),
            ("http://user:pw@zipkin/api/v2/spans", "credentials"),
            ("http://bad host/", "not a valid URL"),
            ("", "http://"),
            ("http://", "not a valid URL"),
            ("http://:9411/", "no host"),
        ] {
            let err = collector_uri(url).unwrap_err().to_string();
            assert!(err.contains(what), "{url}: {err}");
            assert!(err.contains(&format!("{url:?}")), "{url}: {err}");
        }
    }

    #[test]
    fn transient_failures_are_retried_and_refusals_not() {
        for status in [429, 500, 502, 503, 504] {
            let status = StatusCode::from_u16(status).unwrap();
            assert!(BatchError::Status(status).is_transient(), "{status}");
        }
        for status in [400, 401, 403, 404, 413, 415, 301] {
            let status = StatusCode::from_u16(status).unwrap();
            assert!(!BatchError::Status(status).is_transient(), "{status}");
        }
        assert!(BatchError::Timeout(Duration::from_secs(1)).is_transient());
        assert!(!BatchError::Encode("x".into()).is_transient());
    }

    #[tokio::test]
    async fn spawn_outside_http_is_an_error() {
        let Err(err) = spawn_for_test(
            Format::Otlp,
            "https://collector:4318/v1/traces",
            ExporterCounters::default(),
            Settings::default(),
            None,
        ) else {
            panic!("https accepted");
        };
        assert!(matches!(err, SinkError::Scheme { .. }), "{err}");
        assert!(err.to_string().contains("only http://"), "{err}");
    }

    #[test]
    fn spawn_without_runtime_is_an_error() {
        let Err(err) = spawn_for_test(
            Format::Zipkin,
            "http://zipkin/api/v2/spans",
            ExporterCounters::default(),
            Settings::default(),
            None,
        ) else {
            panic!("started without a runtime");
        };
        assert!(matches!(err, SinkError::NoRuntime { .. }), "{err}");
        assert!(err.to_string().contains("no tokio runtime"), "{err}");
    }
}
