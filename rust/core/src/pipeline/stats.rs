//! Where an epoch's time goes: per-stage worker time, worker idle time and the consumer's wait.
//!
//! Always on, so it has to be cheap: a worker reads the clock between the stages of each sample
//! ([`Stopwatch`]) and adds its sample's totals to shared atomic counters once per sample (a handful
//! of relaxed `fetch_add`s against milliseconds of decoding). [`StatsHandle::snapshot`] reads the
//! counters at any time, also after the epoch's iterator is gone.
//!
//! This module only counts; it must not change what the pipeline does or in which order.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A step of loading one sample, in pipeline order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// `fs::read` of the file.
    Read,
    /// Header probe of the bytes and the check against the scan.
    Probe,
    /// Decode to upright RGB8 (DCT-scaled where possible; EXIF orientation, alpha compositing).
    Decode,
    /// Resampling the crop window to the bucket size (0 when the decode already has the size).
    Resize,
    /// Crop + flip + normalise/convert + planar CHW write into the batch buffer.
    Write,
}

const STAGES: usize = 5;

/// Time totals of one epoch (or of it so far). Durations are in seconds: stage, busy and idle
/// times are summed over the worker threads (thread wall time, so two threads busy for one second
/// count two); `queue_wait_s` and `wall_s` are wall time of the consumer.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LoadStats {
    /// Samples loaded successfully (all of an epoch's samples once it has run to the end; samples of
    /// batches loaded ahead but never yielded count too).
    pub samples: usize,
    /// Samples that failed (skipped or raised).
    pub failed: usize,
    /// Batches handed to the consumer.
    pub batches: usize,
    /// Worker threads started.
    pub threads: usize,
    /// Reading files ([`Stage::Read`]).
    pub read_s: f64,
    /// Header probe and check ([`Stage::Probe`]).
    pub probe_s: f64,
    /// Decoding ([`Stage::Decode`]).
    pub decode_s: f64,
    /// Resizing ([`Stage::Resize`]).
    pub resize_s: f64,
    /// Crop, flip, normalise and write ([`Stage::Write`]).
    pub write_s: f64,
    /// The rest of the workers' time on samples: crop placement, random draws, captions, per-thread
    /// set-up, bookkeeping. `busy_s` minus the five stages.
    pub other_s: f64,
    /// Worker time spent on samples, from taking a job to finishing it.
    pub busy_s: f64,
    /// Worker time spent waiting for a job (no batch started that has samples left).
    pub idle_s: f64,
    /// Consumer time spent waiting for the next batch to be complete.
    pub queue_wait_s: f64,
    /// From the start of the epoch to its end (or to now while it runs).
    pub wall_s: f64,
}

/// Shared counters of one epoch; nanoseconds.
#[derive(Debug)]
struct Counters {
    start: Instant,
    /// Nanoseconds from `start` to the end of the epoch plus one; 0 while it runs.
    end: AtomicU64,
    stages: [AtomicU64; STAGES],
    busy: AtomicU64,
    idle: AtomicU64,
    queue_wait: AtomicU64,
    samples: AtomicUsize,
    failed: AtomicUsize,
    batches: AtomicUsize,
    threads: AtomicUsize,
}

/// A cheap, cloneable view of one epoch's counters; see the module docs.
#[derive(Debug, Clone)]
pub struct StatsHandle(Arc<Counters>);

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn secs(n: &AtomicU64) -> f64 {
    n.load(Ordering::Relaxed) as f64 * 1e-9
}

impl StatsHandle {
    /// Counters of an epoch starting now.
    pub(crate) fn start() -> StatsHandle {
        StatsHandle(Arc::new(Counters {
            start: Instant::now(),
            end: AtomicU64::new(0),
            stages: Default::default(),
            busy: AtomicU64::new(0),
            idle: AtomicU64::new(0),
            queue_wait: AtomicU64::new(0),
            samples: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            batches: AtomicUsize::new(0),
            threads: AtomicUsize::new(0),
        }))
    }

    /// The totals so far.
    pub fn snapshot(&self) -> LoadStats {
        let c = &*self.0;
        let stage = |s: Stage| secs(&c.stages[s as usize]);
        let busy = secs(&c.busy);
        let known: f64 = c.stages.iter().map(secs).sum();
        let wall = match c.end.load(Ordering::Relaxed) {
            0 => c.start.elapsed().as_secs_f64(),
            n => (n - 1) as f64 * 1e-9,
        };
        LoadStats {
            samples: c.samples.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            batches: c.batches.load(Ordering::Relaxed),
            threads: c.threads.load(Ordering::Relaxed),
            read_s: stage(Stage::Read),
            probe_s: stage(Stage::Probe),
            decode_s: stage(Stage::Decode),
            resize_s: stage(Stage::Resize),
            write_s: stage(Stage::Write),
            other_s: (busy - known).max(0.0),
            busy_s: busy,
            idle_s: secs(&c.idle),
            queue_wait_s: secs(&c.queue_wait),
            wall_s: wall,
        }
    }

    pub(crate) fn add_thread(&self) {
        self.0.threads.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add_idle(&self, d: Duration) {
        self.0.idle.fetch_add(nanos(d), Ordering::Relaxed);
    }

    pub(crate) fn add_queue_wait(&self, d: Duration) {
        self.0.queue_wait.fetch_add(nanos(d), Ordering::Relaxed);
    }

    pub(crate) fn add_batch(&self) {
        self.0.batches.fetch_add(1, Ordering::Relaxed);
    }

    /// Add one sample's stage times and its busy time; `ok`: whether it loaded.
    pub(crate) fn add_sample(&self, watch: &Stopwatch, busy: Duration, ok: bool) {
        let c = &*self.0;
        for (total, &n) in c.stages.iter().zip(&watch.stages) {
            if n != 0 {
                total.fetch_add(n, Ordering::Relaxed);
            }
        }
        c.busy.fetch_add(nanos(busy), Ordering::Relaxed);
        if ok {
            c.samples.fetch_add(1, Ordering::Relaxed);
        } else {
            c.failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Freeze `wall_s` at now (the first call wins).
    pub(crate) fn end(&self) {
        let n = nanos(self.0.start.elapsed()).saturating_add(1);
        let _ = self
            .0
            .end
            .compare_exchange(0, n, Ordering::Relaxed, Ordering::Relaxed);
    }
}

/// Stage times of one sample: [`Stopwatch::lap`] charges the time since the previous lap (or the
/// start) to a stage.
#[derive(Debug)]
pub(crate) struct Stopwatch {
    last: Instant,
    stages: [u64; STAGES],
}

impl Stopwatch {
    pub(crate) fn start() -> Stopwatch {
        Stopwatch {
            last: Instant::now(),
            stages: [0; STAGES],
        }
    }

    /// Charge the time since the last lap to `stage`.
    pub(crate) fn lap(&mut self, stage: Stage) {
        let now = Instant::now();
        self.stages[stage as usize] += nanos(now - self.last);
        self.last = now;
    }

    /// Restart the lap clock without charging anything (time that belongs to no stage).
    pub(crate) fn skip(&mut self) {
        self.last = Instant::now();
    }

    /// Move `d` of what was charged to `from` over to `to` (saturating at what `from` holds).
    pub(crate) fn move_time(&mut self, from: Stage, to: Stage, d: Duration) {
        let n = nanos(d).min(self.stages[from as usize]);
        self.stages[from as usize] -= n;
        self.stages[to as usize] += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn laps_add_up_and_other_is_the_rest() {
        let h = StatsHandle::start();
        let before = Instant::now();
        let mut w = Stopwatch::start();
        std::thread::sleep(Duration::from_millis(2));
        w.lap(Stage::Read);
        // A loaded machine may oversleep: the read lap is bounded by what really elapsed.
        let read_at_most = before.elapsed().as_secs_f64();
        w.skip();
        std::thread::sleep(Duration::from_millis(3));
        w.lap(Stage::Write);
        w.move_time(Stage::Write, Stage::Resize, Duration::from_millis(1));
        h.add_sample(&w, Duration::from_millis(10), true);
        h.add_sample(&Stopwatch::start(), Duration::ZERO, false);
        h.add_queue_wait(Duration::from_millis(4));
        h.add_idle(Duration::from_millis(5));
        h.add_thread();
        h.add_batch();
        let s = h.snapshot();
        assert_eq!((s.samples, s.failed, s.batches, s.threads), (1, 1, 1, 1));
        assert!(s.read_s >= 0.002 && s.read_s <= read_at_most, "{s:?}");
        assert!((s.resize_s - 0.001).abs() < 1e-9, "{s:?}");
        assert!(s.write_s >= 0.002, "{s:?}");
        let stages = s.read_s + s.probe_s + s.decode_s + s.resize_s + s.write_s + s.other_s;
        assert!(
            (stages - s.busy_s).abs() < 1e-9 || s.other_s == 0.0,
            "{s:?}"
        );
        assert!((s.queue_wait_s - 0.004).abs() < 1e-9);
        assert!((s.idle_s - 0.005).abs() < 1e-9);

        // The wall clock runs until `end`, then stays put.
        h.end();
        let a = h.snapshot().wall_s;
        std::thread::sleep(Duration::from_millis(2));
        h.end();
        assert_eq!(h.snapshot().wall_s, a);
        assert!(a >= 0.005);
    }
}
