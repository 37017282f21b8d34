//! Latency per time window of a run (`--window`). A run's percentiles dilute a moment that lasts a
//! second or two, such as a mass expiry, into all its other seconds; windows show that moment alone.
//!
//! Windows are aligned on the wall clock (they start at multiples of their length since the Unix
//! epoch), so that a window can start exactly at a known moment: the first one may begin before the
//! recording does. An operation belongs to the window in which it started, like the warmup cut. Each
//! task records into its own window and hands it to the shared map when it moves on to the next one,
//! so the hot path takes no lock but once per window per task.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::{cli::MAX_WINDOWS, load::HISTOGRAM_MAX_US};

/// Two significant digits: a window's p99 needs no more, and each window's histogram stays small
/// (about 24 KiB) for thousands of windows.
const WINDOW_HISTOGRAM_DIGITS: u8 = 2;

/// One window as reported: operations that started in it, and their latency in microseconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WindowReport {
    /// Seconds from the start of recording to the start of the window: negative for a first window
    /// that began before the recording.
    pub start_s: f64,
    /// The window's start on the wall clock, Unix milliseconds.
    pub start_unix_ms: u64,
    pub ok: u64,
    pub failed: u64,
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
}

struct Counts {
    latency_us: Histogram<u64>,
    failed: u64,
}

impl Counts {
    fn new() -> Self {
        let latency_us =
            Histogram::new_with_bounds(1, HISTOGRAM_MAX_US, WINDOW_HISTOGRAM_DIGITS).expect("valid histogram bounds");
        Self { latency_us, failed: 0 }
    }

    fn add(&mut self, other: &Self) {
        self.latency_us.add(&other.latency_us).expect("window histograms share their bounds");
        self.failed += other.failed;
    }
}

/// The windows of one run, shared by its tasks.
pub struct Windows {
    width: Duration,
    /// The start of the first window, at or before the start of recording.
    origin: Instant,
    origin_unix_ms: u64,
    /// How long before the start of recording the first window starts.
    lead: Duration,
    /// Windows by index, merged from the tasks as each one leaves a window.
    merged: Mutex<BTreeMap<u64, Counts>>,
}

impl Windows {
    /// Windows of `width` (whole milliseconds) for a recording that starts at `start`, which is
    /// `start_unix_ms` on the wall clock.
    pub fn new(width: Duration, start: Instant, start_unix_ms: u64) -> Arc<Self> {
        let width_ms = u64::try_from(width.as_millis()).expect("a window of at most an hour");
        assert!(width_ms > 0 && width == Duration::from_millis(width_ms), "a window is whole milliseconds");
        let lead = Duration::from_millis(start_unix_ms % width_ms);
        // An `Instant` that early cannot be: the grid then starts with the recording.
        let (origin, lead) = start.checked_sub(lead).map_or((start, Duration::ZERO), |origin| (origin, lead));
        Arc::new(Self {
            width,
            origin,
            origin_unix_ms: start_unix_ms - u64::try_from(lead.as_millis()).expect("less than a window"),
            lead,
            merged: Mutex::new(BTreeMap::new()),
        })
    }

    /// The index of the window in which `at` falls; `None` past the last window kept.
    fn index(&self, at: Instant) -> Option<u64> {
        let index = u64::try_from(at.saturating_duration_since(self.origin).as_nanos() / self.width.as_nanos()).ok()?;
        (index < MAX_WINDOWS).then_some(index)
    }

    fn merge(&self, index: u64, counts: &Counts) {
        let mut merged = self.merged.lock().expect("no task panics while holding the windows");
        merged.entry(index).or_insert_with(Counts::new).add(counts);
    }

    /// Every window from the first to the last in which an operation started, those in which none did
    /// included (a stall shows as empty windows).
    pub fn report(&self) -> Vec<WindowReport> {
        let merged = self.merged.lock().expect("no task panics while holding the windows");
        let Some(&last) = merged.keys().next_back() else { return Vec::new() };
        let empty = Counts::new();
        (0..=last)
            .map(|index| {
                let counts = merged.get(&index).unwrap_or(&empty);
                let h = &counts.latency_us;
                let at = |q: f64| if h.is_empty() { 0 } else { h.value_at_quantile(q) };
                let offset_ms = u64::try_from(self.width.as_millis()).unwrap_or(u64::MAX).saturating_mul(index);
                WindowReport {
                    // Whole milliseconds, so that the JSON reads 0.433 rather than 0.43300000000000005.
                    start_s: (offset_ms as f64 - self.lead.as_millis() as f64) / 1_000.0,
                    start_unix_ms: self.origin_unix_ms + offset_ms,
                    ok: h.len(),
                    failed: counts.failed,
                    p50: at(0.50),
                    p99: at(0.99),
                    max: if h.is_empty() { 0 } else { h.max() },
                }
            })
            .collect()
    }
}

/// One task's window in progress.
pub struct WindowRecorder {
    windows: Arc<Windows>,
    current: Option<(u64, Counts)>,
}

impl WindowRecorder {
    pub fn new(windows: Arc<Windows>) -> Self {
        Self { windows, current: None }
    }

    /// Records an operation that started at `started`: its latency when it succeeded, `None` when it
    /// failed.
    pub fn record(&mut self, started: Instant, latency_us: Option<u64>) {
        let Some(index) = self.windows.index(started) else { return };
        if self.current.as_ref().is_some_and(|(current, _)| *current != index) {
            self.flush();
        }
        let (_, counts) = self.current.get_or_insert_with(|| (index, Counts::new()));
        match latency_us {
            Some(micros) => counts.latency_us.saturating_record(micros.max(1)),
            None => counts.failed += 1,
        }
    }

    /// Hands the window in progress to the shared map; to be called when the task stops.
    pub fn flush(&mut self) {
        if let Some((index, counts)) = self.current.take() {
            self.windows.merge(index, &counts);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn operations_count_in_the_window_they_started_in_across_tasks() {
        let start = Instant::now();
        let windows = Windows::new(100 * MS, start, 1_000_000);
        let (mut a, mut b) = (WindowRecorder::new(windows.clone()), WindowRecorder::new(windows.clone()));
        a.record(start, Some(10));
        a.record(start + 99 * MS, Some(20));
        b.record(start + 50 * MS, None);
        a.record(start + 100 * MS, Some(200));
        b.record(start + 250 * MS, Some(5));
        a.flush();
        b.flush();
        let report = windows.report();
        assert_eq!(report.len(), 3);
        assert_eq!((report[0].ok, report[0].failed, report[0].max), (2, 1, 20));
        assert_eq!((report[1].ok, report[1].failed, report[1].p50), (1, 0, 200));
        assert_eq!((report[2].start_unix_ms, report[2].ok), (1_000_200, 1));
        assert!((report[2].start_s - 0.2).abs() < 1e-9);
    }

    #[test]
    fn windows_start_at_multiples_of_their_length_on_the_wall_clock() {
        let start = Instant::now();
        let windows = Windows::new(100 * MS, start, 1_000_060);
        let mut task = WindowRecorder::new(windows.clone());
        task.record(start, Some(1));
        task.record(start + 39 * MS, Some(2));
        task.record(start + 40 * MS, Some(3));
        task.flush();
        let report = windows.report();
        assert_eq!(
            report.iter().map(|w| (w.start_unix_ms, w.ok)).collect::<Vec<_>>(),
            [(1_000_000, 2), (1_000_100, 1)]
        );
        assert!((report[0].start_s + 0.06).abs() < 1e-9 && (report[1].start_s - 0.04).abs() < 1e-9, "{report:?}");
    }

    #[test]
    fn a_window_in_which_nothing_started_is_reported_empty() {
        let start = Instant::now();
        let windows = Windows::new(10 * MS, start, 0);
        let mut task = WindowRecorder::new(windows.clone());
        task.record(start, Some(7));
        task.record(start + 35 * MS, Some(7));
        task.flush();
        let oks: Vec<_> = windows.report().iter().map(|w| (w.ok, w.p99)).collect();
        assert_eq!(oks, [(1, 7), (0, 0), (0, 0), (1, 7)]);
    }

    #[test]
    fn operations_past_the_last_window_kept_are_left_out() {
        let start = Instant::now();
        let windows = Windows::new(MS, start, 0);
        let mut task = WindowRecorder::new(windows.clone());
        task.record(start + (MAX_WINDOWS as u32 - 1) * MS, Some(3));
        task.record(start + MAX_WINDOWS as u32 * MS, Some(3));
        task.flush();
        let report = windows.report();
        assert_eq!(report.len() as u64, MAX_WINDOWS);
        assert_eq!(report.iter().map(|w| w.ok).sum::<u64>(), 1);
    }

    #[test]
    fn no_operation_no_window() {
        let windows = Windows::new(MS, Instant::now(), 0);
        WindowRecorder::new(windows.clone()).flush();
        assert!(windows.report().is_empty());
    }
}
