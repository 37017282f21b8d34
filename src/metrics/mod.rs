//! Prometheus metrics: what the server counts as calls happen, what it reads at scrape time, and the
//! small HTTP endpoint that serves them.
//!
//! - [`rpc`]: requests by RPC and status code and their latency, counted by a tower layer on the gRPC
//!   server, so every call is counted, health, reflection and the errors tonic answers by itself included.
//! - This module: the business counters the gRPC handlers feed from facts they already have (a grant,
//!   a refusal's reason, a commit's charges, a fired alert), and the values read at each scrape from
//!   the ledger (open holds) and the durability stats (log and snapshots).
//! - [`endpoint`]: `GET /metrics` over HTTP/1.1 in the Prometheus text format.
//!
//! Label values come from small fixed sets (RPC names, status codes, reasons, sources, alert kinds),
//! so the number of series is bounded; the `tenant` label multiplies the business series by the number
//! of tenants and is off unless asked for.

pub mod endpoint;
pub mod rpc;

use std::{fmt, net::SocketAddr, sync::Arc};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabel, EncodeLabelSet, EncodeMetric, LabelSetEncoder, NoLabelSet},
    metrics::{MetricType, counter::ConstCounter, counter::Counter, family::Family, gauge::ConstGauge},
    registry::Registry,
};
use tokio::sync::watch;

use crate::{
    durability::stats::{LogStats, SYNC_BUCKETS_MICROS, SnapshotStats},
    ledger::{
        Draws, Milli, Source, TenantId,
        alerts::{Alert, AlertKind, AlertSink},
    },
};

/// Where the endpoint listens, and whether business metrics carry a `tenant` label.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetricsConfig {
    /// `None`: no endpoint (the counters are still kept; they cost a few atomic additions per call).
    pub listen: Option<SocketAddr>,
    pub tenant_labels: bool,
}

/// The counters the server keeps as calls happen. Shared by the gRPC layer and the endpoint.
#[derive(Debug)]
pub struct Metrics {
    tenant_labels: bool,
    pub(crate) rpcs: rpc::RpcMetrics,
    business: Business,
}

/// The `tenant` label, left out of the series when tenant labels are off.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct TenantLabel(Option<TenantId>);

impl EncodeLabelSet for TenantLabel {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> fmt::Result {
        match &self.0 {
            Some(tenant) => ("tenant", tenant.as_str()).encode(encoder.encode_label()),
            None => Ok(()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SourceLabel {
    source: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

type Tenanted<L> = Family<(TenantLabel, L), Counter>;

/// The business counters. Without tenant labels their series are resolved once, here, so that the
/// hot path adds to a counter without looking up its labels; with tenant labels each addition looks
/// up (or creates) its tenant's series.
#[derive(Debug, Default)]
struct Business {
    granted: Family<TenantLabel, Counter>,
    refused: Tenanted<ReasonLabel>,
    charged: Tenanted<SourceLabel>,
    overage: Family<TenantLabel, Counter>,
    alerts: Tenanted<KindLabel>,
    /// Without tenant labels: the series of `granted`, `charged` per source and `overage`.
    untenanted: Option<Untenanted>,
}

#[derive(Debug)]
struct Untenanted {
    granted: Counter,
    charged: [Counter; 3],
    overage: Counter,
}

impl Business {
    fn new(tenant_labels: bool) -> Self {
        let mut business = Self::default();
        if !tenant_labels {
            let none = || TenantLabel(None);
            business.untenanted = Some(Untenanted {
                granted: business.granted.get_or_create_owned(&none()),
                charged: Source::DRAW_ORDER
                    .map(|source| business.charged.get_or_create_owned(&(none(), source_label(source)))),
                overage: business.overage.get_or_create_owned(&none()),
            });
        }
        business
    }
}

fn source_label(source: Source) -> SourceLabel {
    SourceLabel {
        source: match source {
            Source::EnvironmentAllocation => "allocation",
            Source::TenantPool => "tenant_pool",
            Source::PayAsYouGo => "payg",
        },
    }
}

fn kind_label(kind: AlertKind) -> KindLabel {
    KindLabel {
        kind: match kind {
            AlertKind::EnvironmentLow => "environment_low",
            AlertKind::EnvironmentDepleted => "environment_depleted",
            AlertKind::EnvironmentRestored => "environment_restored",
            AlertKind::AgentNearingLimit => "agent_nearing_limit",
            AlertKind::AgentOverLimit => "agent_over_limit",
            AlertKind::BudgetThreshold => "budget_threshold",
            AlertKind::TenantCapacityUsed => "tenant_capacity_used",
            AlertKind::TenantGraceExhausted => "tenant_grace_exhausted",
        },
    }
}

impl Metrics {
    /// Counters for the RPCs named in `methods` (`package.Service/Method`; calls to any other path are
    /// counted under `rpc="other"`).
    pub fn new(config: &MetricsConfig, methods: impl IntoIterator<Item = String>) -> Self {
        let business = Business::new(config.tenant_labels);
        Self { tenant_labels: config.tenant_labels, rpcs: rpc::RpcMetrics::new(methods), business }
    }

    /// A new hold was granted (not a dry run, nor a retry that returned an earlier grant).
    pub fn reservation_granted(&self, tenant: &TenantId) {
        match &self.business.untenanted {
            Some(untenanted) => untenanted.granted.inc(),
            None => self.business.granted.get_or_create(&TenantLabel(Some(tenant.clone()))).inc(),
        };
    }

    /// A reservation was refused with `reason` (an `ErrorInfo` reason, or `INVALID_ARGUMENT`).
    /// `tenant` is asked only with tenant labels on, as finding it may cost a ledger lookup.
    pub fn reservation_refused(&self, reason: &'static str, tenant: impl FnOnce() -> Option<TenantId>) {
        let tenant = TenantLabel(if self.tenant_labels { tenant() } else { None });
        self.business.refused.get_or_create(&(tenant, ReasonLabel { reason })).inc();
    }

    /// A commit charged `charged` per source and `overage_milli` that no source covered (not a retry).
    pub fn committed(&self, tenant: &TenantId, charged: &Draws, overage_milli: Milli) {
        if let Some(untenanted) = &self.business.untenanted {
            for (source, counter) in Source::DRAW_ORDER.into_iter().zip(&untenanted.charged) {
                counter.inc_by(charged.get(source));
            }
            untenanted.overage.inc_by(overage_milli);
            return;
        }
        for (source, amount) in charged.iter() {
            let labels = (TenantLabel(Some(tenant.clone())), source_label(source));
            self.business.charged.get_or_create(&labels).inc_by(amount);
        }
        if overage_milli > 0 {
            self.business.overage.get_or_create(&TenantLabel(Some(tenant.clone()))).inc_by(overage_milli);
        }
    }

    fn alert_fired(&self, alert: &Alert) {
        let tenant = TenantLabel(self.tenant_labels.then(|| alert.tenant.clone()));
        self.business.alerts.get_or_create(&(tenant, kind_label(alert.kind))).inc();
    }

    /// Everything the endpoint serves: the counters above and `sources`, read at each scrape.
    pub fn registry(&self, sources: ScrapeSources) -> Registry {
        let mut registry = Registry::with_prefix("quotad");
        self.rpcs.register(&mut registry);
        let business = &self.business;
        registry.register(
            "reservations_granted",
            "New holds granted by CheckAndReserve (not dry runs, nor retries that returned an earlier grant)",
            business.granted.clone(),
        );
        registry.register(
            "reservations_refused",
            "CheckAndReserve calls refused, by the ErrorInfo reason of the refusal (INVALID_ARGUMENT for a bad field)",
            business.refused.clone(),
        );
        registry.register(
            "charged_milli",
            "Thousandths of a message charged by commits, by source (allocation, tenant_pool, payg)",
            business.charged.clone(),
        );
        registry.register(
            "overage_milli",
            "Thousandths of a message committed that no source covered",
            business.overage.clone(),
        );
        registry.register("alerts", "Alerts fired, by kind", business.alerts.clone());
        registry.register_collector(Box::new(sources));
        registry
    }
}

/// Counts every alert the ledger fires, then hands it on to the live watchers.
pub struct CountedAlerts {
    pub metrics: Arc<Metrics>,
    pub next: Arc<dyn AlertSink>,
}

impl AlertSink for CountedAlerts {
    fn publish(&self, alert: &Alert) {
        self.metrics.alert_fired(alert);
        self.next.publish(alert);
    }
}

/// What is read at each scrape rather than counted as it happens.
pub struct ScrapeSources {
    /// The server-wide number of open holds.
    pub open_holds: Box<dyn Fn() -> u64 + Send + Sync>,
    /// `None` when state is kept in memory only.
    pub storage: Option<StorageSources>,
}

/// The write-ahead log's and the snapshots' stats.
pub struct StorageSources {
    pub log: Arc<LogStats>,
    pub snapshots: Arc<SnapshotStats>,
    /// `true` while the log writes.
    pub log_healthy: watch::Receiver<bool>,
}

impl fmt::Debug for ScrapeSources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScrapeSources").field("storage", &self.storage.is_some()).finish_non_exhaustive()
    }
}

impl fmt::Debug for StorageSources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StorageSources").finish_non_exhaustive()
    }
}

impl Collector for ScrapeSources {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let open_holds = ConstGauge::new((self.open_holds)());
        let help = "Holds granted and not yet committed, released or expired, across the server.";
        open_holds.encode(encoder.encode_descriptor("open_holds", help, None, MetricType::Gauge)?)?;
        if let Some(storage) = &self.storage {
            storage.encode(&mut encoder)?;
        }
        Ok(())
    }
}

fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    ConstCounter::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Counter)?)
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: f64) -> fmt::Result {
    ConstGauge::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

impl StorageSources {
    fn encode(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        self.encode_log(encoder)?;
        self.encode_snapshots(encoder)
    }

    fn encode_log(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        counter(encoder, "log_records", "Records appended to the write-ahead log since startup.", self.log.records())?;
        counter(encoder, "log_bytes", "Bytes of those records, framing included.", self.log.bytes())?;
        let healthy = if *self.log_healthy.borrow() { 1.0 } else { 0.0 };
        gauge(encoder, "log_healthy", "1 while the write-ahead log writes, 0 while it fails.", healthy)?;
        let syncs = self.log.syncs();
        let counts = syncs.counts();
        let bounds = SYNC_BUCKETS_MICROS.iter().map(|micros| *micros as f64 / 1e6).chain([f64::INFINITY]);
        let buckets: Vec<(f64, u64)> = bounds.zip(counts).collect();
        let help = "How long each fdatasync of the write-ahead log took.";
        let mut metric = encoder.encode_descriptor("log_sync_duration_seconds", help, None, MetricType::Histogram)?;
        metric.encode_histogram::<NoLabelSet>(syncs.sum_micros() as f64 / 1e6, counts.iter().sum(), &buckets, None)
    }

    fn encode_snapshots(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let snapshots = &self.snapshots;
        counter(encoder, "snapshots_written", "Snapshots written since startup.", snapshots.written_count())?;
        counter(encoder, "snapshots_failed", "Snapshots that failed since startup.", snapshots.failed_count())?;
        // Until a snapshot is written there is no last one to describe.
        let Some(last) = snapshots.last() else { return Ok(()) };
        let help = "How long the last snapshot took to write.";
        gauge(encoder, "snapshot_last_duration_seconds", help, last.duration.as_secs_f64())?;
        gauge(encoder, "snapshot_last_bytes", "Size of the last snapshot file.", last.bytes as f64)?;
        let help =
            "Tenants, environments, links, rate card versions, API keys and recent-alerts logs in the last snapshot.";
        gauge(encoder, "snapshot_last_items", help, last.items as f64)?;
        let help = "When the last snapshot finished, in Unix seconds.";
        gauge(encoder, "snapshot_last_timestamp_seconds", help, last.unix_ms as f64 / 1e3)
    }
}
