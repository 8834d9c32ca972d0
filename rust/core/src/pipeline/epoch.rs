//! One epoch, from the consumer's side: the plan, the worker threads, up to `prefetch` batches in
//! flight, and batches yielded strictly in plan order ([`EpochIter`]).
//!
//! Starts and stops the workers and hands them jobs; it must not load samples itself (that is
//! `worker`), and it must never block without a way out: every wait ends when the workers do.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};

use super::batch::{Batch, BatchState, TensorState};
use super::buffer::{BufferSource, PixelBuffer};
use super::loader::Inner;
use super::options::OnError;
use super::stats::{LoadStats, StatsHandle};
use super::worker::{worker_loop, Draw, Job, WorkerCtx};
use crate::error::{Error, Result};

/// One batch to load: its bucket and, per slot, the sample, its image and where its draws come
/// from.
pub(super) struct Planned {
    pub(super) bucket: usize,
    pub(super) slots: Vec<(usize, usize, Draw)>,
}

impl EpochIter {
    /// Start loading `plan` from batch `start_batch` (an epoch's plan, or the cache build's):
    /// worker threads start at once and the first `prefetch` batches are queued before this
    /// returns. `decode`: the batches get pixels (else an empty pixel buffer); `serve`: they get
    /// the cache's tensors. If `start_batch` is past the end of the plan, the iterator yields one
    /// [`Error::InvalidArgument`] and ends.
    pub(super) fn start(
        inner: Arc<Inner>,
        plan: Vec<Planned>,
        epoch: u64,
        start_batch: usize,
        source: Option<Box<dyn BufferSource>>,
        (decode, serve): (bool, bool),
    ) -> EpochIter {
        let (jobs_tx, jobs_rx) = crossbeam_channel::unbounded::<Job>();
        let (done_tx, done_rx) = crossbeam_channel::unbounded::<()>();
        let mut it = EpochIter {
            start_error: None,
            next_start: start_batch,
            next_yield: start_batch,
            in_flight: VecDeque::new(),
            jobs: Some(jobs_tx),
            done: done_rx,
            stop: Arc::new(AtomicBool::new(false)),
            workers: Vec::new(),
            plan,
            inner,
            source,
            decode,
            serve,
            stats: StatsHandle::start(),
            pid: std::process::id(),
        };
        if start_batch > it.plan.len() {
            it.start_error = Some(Error::InvalidArgument(format!(
                "start_batch must be at most {} (batches in epoch {epoch}), got {start_batch}",
                it.plan.len()
            )));
            return it;
        }
        if start_batch == it.plan.len() {
            // Nothing to load (resumed at the end, or drop_last left no batch): no threads needed.
            return it;
        }
        // More threads than samples that can be in flight would only idle.
        let o = &it.inner.opts;
        let threads = o
            .threads()
            .min(o.prefetch.saturating_mul(o.batch_size))
            .max(1);
        for i in 0..threads {
            let ctx = WorkerCtx {
                inner: Arc::clone(&it.inner),
                epoch,
                jobs: jobs_rx.clone(),
                done: done_tx.clone(),
                stop: Arc::clone(&it.stop),
                stats: it.stats.clone(),
            };
            let spawned = std::thread::Builder::new()
                .name(format!("fastdiff-load-{i}"))
                .spawn(move || worker_loop(ctx));
            match spawned {
                Ok(handle) => {
                    it.workers.push(handle);
                    it.stats.add_thread();
                }
                // Fewer threads only make it slower; with none at all, report why.
                Err(e) if it.workers.is_empty() => {
                    it.start_error = Some(Error::io(
                        &it.inner.root,
                        std::io::Error::other(format!("cannot start loader threads: {e}")),
                    ));
                    return it;
                }
                Err(_) => break,
            }
        }
        while it.in_flight.len() < it.inner.opts.prefetch && it.start_next() {}
        it
    }
}

/// The batches of one epoch, in plan order; see [`crate::pipeline`] for how they are produced.
///
/// Yields `Ok(batch)` per batch (batches whose samples all failed with [`OnError::Skip`] are left
/// out) or, with [`OnError::Raise`], `Err` for the first failed sample in plan order and then ends.
/// Other errors, each yielded once before the iterator ends: [`Error::Resource`] when a batch's
/// memory cannot be had (the allocator or the [`BufferSource`] refused it), [`Error::Internal`]
/// when the iterator is advanced in a forked child of the process that started it, or when every
/// worker thread has exited early.
///
/// Ending (normally, by error, or by drop) stops and joins the worker threads; a worker finishes at
/// most its current sample first, so dropping mid-epoch returns within one sample's load time.
pub struct EpochIter {
    inner: Arc<Inner>,
    plan: Vec<Planned>,
    /// Plan position of the next batch to start.
    next_start: usize,
    /// Plan position of the next batch to yield.
    next_yield: usize,
    /// Started batches not yet yielded, in plan order.
    in_flight: VecDeque<Arc<BatchState>>,
    /// `None` once the epoch ended: dropping the sender lets idle workers exit.
    jobs: Option<Sender<Job>>,
    /// One message per completed batch; disconnected when every worker has exited.
    done: Receiver<()>,
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
    /// A reason the epoch could not start (or a batch buffer could not be had), yielded next.
    start_error: Option<Error>,
    /// Where batch memory comes from; `None`: the loader's pool.
    source: Option<Box<dyn BufferSource>>,
    /// Whether batches get decoded pixels.
    decode: bool,
    /// Whether batches get the cache's tensors.
    serve: bool,
    stats: StatsHandle,
    /// The process that started the workers: after a `fork` the child has none of them.
    pid: u32,
}

impl std::fmt::Debug for EpochIter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EpochIter")
            .field("batches", &self.plan.len())
            .field("remaining", &self.remaining())
            .field("in_flight", &self.in_flight.len())
            .field("workers", &self.workers.len())
            .finish_non_exhaustive()
    }
}

impl EpochIter {
    /// An iterator that yields `err` once and ends (a plan that could not be made).
    pub(super) fn failed(
        inner: Arc<Inner>,
        epoch: u64,
        err: Error,
        mode: (bool, bool),
    ) -> EpochIter {
        let mut it = EpochIter::start(inner, Vec::new(), epoch, 0, None, mode);
        it.start_error = Some(err);
        it
    }

    /// Batches of the plan not yet yielded (counting from `start_batch`; 0 once the iterator ended).
    /// An upper bound when whole batches are skipped.
    pub fn remaining(&self) -> usize {
        if self.jobs.is_none() || self.start_error.is_some() {
            0
        } else {
            self.plan.len() - self.next_yield
        }
    }

    /// Where this epoch's time went so far (final once the iterator has ended); see [`LoadStats`].
    pub fn stats(&self) -> LoadStats {
        self.stats.snapshot()
    }

    /// A handle to this epoch's counters that stays readable after the iterator is dropped.
    pub fn stats_handle(&self) -> StatsHandle {
        self.stats.clone()
    }

    /// Wait up to `timeout` for the next batch to be ready; `true` when [`Iterator::next`] will not
    /// block (the batch is complete, or the epoch is over or failed). Time spent here counts as
    /// queue wait.
    ///
    /// Lets a caller that must stay responsive (Python checking for Ctrl-C between waits) wait in
    /// slices instead of blocking in `next` for a whole slow batch.
    pub fn wait_ready(&self, timeout: std::time::Duration) -> bool {
        let Some(front) = self.in_flight.front() else {
            return true;
        };
        if self.forked() {
            return true; // `next` says why
        }
        let start = std::time::Instant::now();
        let deadline = start + timeout;
        let mut ready = true;
        while front.pending.load(Ordering::Acquire) != 0 {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.done.recv_timeout(left) {
                Ok(()) => {}
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    ready = false;
                    break;
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
            }
        }
        self.stats.add_queue_wait(start.elapsed());
        ready
    }

    /// Start the next batch of the plan if there is one; returns whether it did.
    fn start_next(&mut self) -> bool {
        let (Some(plan), Some(jobs)) = (self.plan.get(self.next_start), &self.jobs) else {
            return false;
        };
        let bucket = self.inner.buckets[plan.bucket];
        let per_sample = 3 * bucket.width as usize * bucket.height as usize;
        let n = plan.slots.len();
        let dtype = self.inner.opts.dtype;
        let pixels = match (&mut self.source, self.decode) {
            (_, false) => PixelBuffer::from_pool(&self.inner.empty_pool, dtype, 0),
            (None, true) => PixelBuffer::from_pool(&self.inner.pool, dtype, n * per_sample),
            (Some(source), true) => {
                PixelBuffer::from_source(source.as_mut(), dtype, n * per_sample)
            }
        };
        let cache = self.inner.cache.as_ref().filter(|_| self.serve);
        let specs = cache.map(|c| c.tensors(bucket)).unwrap_or_default();
        let mut tensors = Vec::with_capacity(specs.len());
        for (name, latent, dtype, shape) in specs {
            match TensorState::from_pool(&self.inner.tensor_pool, name, latent, dtype, shape, n) {
                Ok(t) => tensors.push(t),
                Err(err) => {
                    self.start_error = Some(err);
                    return false;
                }
            }
        }
        let views_opts = &self.inner.opts.views;
        let mut views = Vec::new();
        for (name, dtype, shape) in views_opts.tensors((bucket.width, bucket.height), dtype) {
            match TensorState::from_pool(&self.inner.view_pool, name, false, dtype, shape, n) {
                Ok(t) => views.push(t),
                Err(err) => {
                    self.start_error = Some(err);
                    return false;
                }
            }
        }
        let pixels = match pixels {
            Ok(p) => p,
            Err(err) => {
                self.start_error = Some(err);
                return false;
            }
        };
        let state = Arc::new(BatchState {
            bucket,
            per_sample: if self.decode { per_sample } else { 0 },
            dtype,
            base: pixels.as_ptr().cast_mut(),
            pixels: Mutex::new(Some(pixels)),
            outcomes: Mutex::new((0..n).map(|_| None).collect()),
            pending: AtomicUsize::new(n),
            tensors,
            decode: self.decode,
            views,
            has_mask: views_opts.has_mask(),
            controls: views_opts.control_dirs.len(),
        });
        for (slot, &(sample, image, draw)) in plan.slots.iter().enumerate() {
            // Workers only exit after the sender is dropped (or on stop), so this cannot fail
            // while `jobs` is Some; a failure would only mean the batch never completes.
            let _ = jobs.send(Job {
                batch: Arc::clone(&state),
                slot,
                sample,
                image,
                draw,
            });
        }
        self.in_flight.push_back(state);
        self.next_start += 1;
        true
    }

    /// End the epoch: stop the workers, let idle ones see the closed channel, and join them all.
    fn finish(&mut self) {
        self.stats.end();
        self.stop.store(true, Ordering::Relaxed);
        self.jobs = None;
        self.in_flight.clear();
        if self.forked() {
            // The handles name threads of the parent process: joining (or detaching) them here
            // would wait forever or act on thread ids that mean nothing in this process.
            self.workers.drain(..).for_each(std::mem::forget);
            return;
        }
        for handle in self.workers.drain(..) {
            // A worker panic outside the per-sample guard has already been reported by the
            // panic hook; there is nothing more to do with it here.
            let _ = handle.join();
        }
    }

    /// Whether this is a forked child of the process that started the epoch.
    fn forked(&self) -> bool {
        std::process::id() != self.pid
    }

    /// Turn a completed batch into what the iterator yields: `Ok(None)` if all its samples failed
    /// and were skipped.
    fn assemble(&self, state: &BatchState) -> Result<Option<Batch>> {
        let outcomes =
            std::mem::take(&mut *state.outcomes.lock().unwrap_or_else(|p| p.into_inner()));
        let mut pixels = state
            .pixels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .expect("a completed batch is assembled once");
        let mut samples = Vec::with_capacity(outcomes.len());
        let mut keep = Vec::with_capacity(outcomes.len());
        for outcome in outcomes {
            match outcome.expect("every slot of a completed batch has an outcome") {
                Ok(meta) => {
                    samples.push(meta);
                    keep.push(true);
                }
                // With `Skip` the worker has recorded the failure in the report.
                Err(err) if self.inner.opts.on_error == OnError::Raise => return Err(err),
                Err(_) => keep.push(false),
            }
        }
        if samples.is_empty() {
            return Ok(None);
        }
        let mut tensors = Vec::with_capacity(state.tensors.len());
        for t in state.tensors.iter().chain(&state.views) {
            let mut buffer = (t.buffer.lock().unwrap_or_else(|p| p.into_inner()).take())
                .expect("a completed batch is assembled once");
            let values = t.shape.iter().product::<usize>();
            if samples.len() < keep.len() {
                buffer.retain_samples(&keep, values);
            }
            let shape = std::iter::once(samples.len()).chain(t.shape.iter().copied());
            tensors.push((t.name.clone(), buffer, shape.collect()));
        }
        if samples.len() < keep.len() {
            pixels.retain_samples(&keep, state.per_sample);
        }
        Ok(Some(Batch {
            bucket: state.bucket,
            pixels,
            samples,
            tensors,
        }))
    }
}

impl Iterator for EpochIter {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if let Some(err) = self.start_error.take() {
            self.finish();
            return Some(Err(err));
        }
        if self.forked() && self.jobs.is_some() {
            self.finish();
            return Some(Err(Error::Internal(
                "this epoch was started in another process: after a fork its worker threads do not \
                 exist here; start a new epoch (iterate the loader again) in this process"
                    .into(),
            )));
        }
        loop {
            let Some(front) = self.in_flight.front().cloned() else {
                // Nothing in flight and nothing left to start: the epoch is over.
                self.finish();
                return None;
            };
            let waiting = std::time::Instant::now();
            while front.pending.load(Ordering::Acquire) != 0 {
                if self.done.recv().is_err() {
                    self.finish();
                    return Some(Err(Error::Internal(
                        "every loader thread exited before the epoch was complete".into(),
                    )));
                }
            }
            self.stats.add_queue_wait(waiting.elapsed());
            self.in_flight.pop_front();
            self.next_yield += 1;
            // Keep `prefetch` batches in flight: this one is consumed, so start the next.
            self.start_next();
            match self.assemble(&front) {
                Ok(Some(batch)) => {
                    self.stats.add_batch();
                    return Some(Ok(batch));
                }
                Ok(None) => continue,
                Err(err) => {
                    self.finish();
                    return Some(Err(err));
                }
            }
        }
    }
}

impl Drop for EpochIter {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::*;
    use super::*;

    #[test]
    fn one_epoch_covers_every_image_once_with_bucket_shapes() {
        let dir = dataset();
        let loader = Loader::new(dir.path(), opts()).unwrap();
        let n = loader.images().len();
        assert_eq!(n, 17);
        let debug = format!("{loader:?}");
        assert!(
            debug.contains("images: 17") && debug.len() < 1000,
            "{debug}"
        );
        let batches = collect(loader.iter_epoch(0, 0));
        assert_eq!(batches.len(), loader.num_batches());
        let mut seen = vec![0; n];
        for b in &batches {
            assert!((1..=3).contains(&b.samples.len()));
            assert!(loader.buckets().contains(&b.bucket));
            assert_eq!(
                b.pixels.len(),
                b.samples.len() * values_per_sample(&b.bucket)
            );
            assert_eq!(b.pixels.dtype(), OutputDtype::F32);
            for s in &b.samples {
                seen[s.index] += 1;
                let e = &loader.images()[s.index];
                assert_eq!(s.path, e.path);
                assert_eq!(s.caption, e.caption);
                let (w, h) = e.header.upright_size();
                assert_eq!(s.original_size, (h, w));
                assert_eq!(s.target_size, (b.bucket.height, b.bucket.width));
                assert_eq!(b.bucket, loader.buckets()[assign(loader.buckets(), w, h)]);
            }
        }
        assert!(seen.iter().all(|&c| c == 1), "{seen:?}");
        let captioned = batches
            .iter()
            .flat_map(|b| &b.samples)
            .find(|s| s.path.ends_with("img04.png"))
            .unwrap();
        assert_eq!(captioned.caption, "caption 4");
    }

    #[test]
    fn output_is_independent_of_threads_and_prefetch() {
        let dir = dataset();
        let run = |num_threads, prefetch| {
            let o = LoaderOptions {
                num_threads,
                prefetch,
                crop: CropMode::Random,
                flip_prob: 0.5,
                seed: 11,
                ..opts()
            };
            collect(Loader::new(dir.path(), o).unwrap().iter_epoch(3, 0))
        };
        let reference = run(1, 1);
        assert_eq!(reference, run(2, 1));
        assert_eq!(reference, run(4, 1));
        assert_eq!(reference, run(2, 4));
        assert_eq!(reference, run(4, 4));
        // The random crop and flip were really exercised.
        let samples: Vec<&SampleMeta> = reference.iter().flat_map(|b| &b.samples).collect();
        assert!(samples.iter().any(|s| s.crop_top_left != (0, 0)));
    }

    #[test]
    fn dropped_batches_are_recycled() {
        let dir = dataset();
        let loader = Loader::new(dir.path(), opts()).unwrap();
        let mut addresses = HashSet::new();
        let mut batches = 0;
        for b in loader.iter_epoch(0, 0) {
            // Each batch is dropped before the next is taken, as a training loop does.
            addresses.insert(b.unwrap().pixels.as_ptr() as usize);
            batches += 1;
        }
        assert!(batches > 4, "{batches}");
        // prefetch (2) in flight + the one being consumed + one recycling: at most 4 allocations.
        assert!(
            addresses.len() <= 4,
            "{} allocations for {batches} batches",
            addresses.len()
        );
        assert!(loader.inner.pool.free_count() > 0);
    }

    /// Hands out 64-byte-aligned heap memory and counts the calls.
    struct CountingSource(Arc<AtomicUsize>);

    struct Aligned(*mut u8, std::alloc::Layout);

    // SAFETY: the allocation is exclusively owned.
    unsafe impl Send for Aligned {}

    impl Drop for Aligned {
        fn drop(&mut self) {
            // SAFETY: allocated in `CountingSource::buffer` with this layout.
            unsafe { std::alloc::dealloc(self.0, self.1) }
        }
    }

    // SAFETY: each call returns a fresh allocation of at least `bytes` bytes, owned by the `Aligned`.
    unsafe impl BufferSource for CountingSource {
        fn buffer(
            &mut self,
            bytes: usize,
        ) -> Result<(std::ptr::NonNull<u8>, Box<dyn std::any::Any + Send>)> {
            if self.0.fetch_add(1, Ordering::Relaxed) == 3 {
                return Err(Error::Resource("out of pinned memory".into()));
            }
            let layout = std::alloc::Layout::from_size_align(bytes.max(1), 64).unwrap();
            // SAFETY: non-zero size.
            let p = unsafe { std::alloc::alloc(layout) };
            let ptr = std::ptr::NonNull::new(p).unwrap();
            Ok((ptr, Box::new(Aligned(p, layout))))
        }
    }

    #[test]
    fn a_buffer_source_gets_the_same_pixels_and_its_errors_end_the_epoch() {
        let dir = dataset();
        let o = LoaderOptions {
            prefetch: 1,
            ..opts()
        };
        let loader = Loader::new(dir.path(), o).unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let source = Box::new(CountingSource(Arc::clone(&calls)));
        let mut it = loader.iter_epoch_into(0, 0, Some(source));
        let reference = collect(loader.iter_epoch(0, 0));
        for want in &reference[..3] {
            let got = it.next().unwrap().unwrap();
            assert_eq!(&got, want);
            let owner = got
                .pixels
                .into_owner()
                .expect("source memory comes back with its owner");
            assert!(owner.downcast::<Aligned>().is_ok());
        }
        // The fourth call failed: its error comes next and ends the epoch.
        let err = it.next().unwrap().unwrap_err();
        assert!(err.to_string().contains("out of pinned memory"), "{err}");
        assert!(it.next().is_none());
        assert_eq!(calls.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn raise_yields_the_error_then_ends() {
        let (dir, _) = colour_dataset(5);
        let bad = dir.path().join("c00b.png");
        write_truncated_png(&bad, 40, 40);
        let o = LoaderOptions {
            batch_size: 2,
            shuffle: false,
            on_error: OnError::Raise,
            ..opts()
        };
        let loader = Loader::new(dir.path(), o).unwrap();
        let mut it = loader.iter_epoch(0, 0);
        let mut ok = 0;
        let err = loop {
            match it.next().expect("the error comes before the end") {
                Ok(_) => ok += 1,
                Err(e) => break e,
            }
        };
        assert_eq!(err.code(), SkipCode::Decode);
        assert_eq!(err.path(), Some(bad.as_path()));
        assert!(it.next().is_none());
        assert_eq!(it.remaining(), 0);
        // c00b sorts second; every earlier batch came out first.
        let bad_batch = collect_plan_position(&loader, &bad);
        assert_eq!(ok, bad_batch);
        // Raise does not record skips.
        assert!(loader.report().skipped.is_empty());
    }

    #[test]
    fn dropping_mid_epoch_is_prompt_and_joins_the_threads() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..40 {
            write_image(&dir.path().join(format!("{i:02}.jpg")), 600, 400, F::Jpeg);
        }
        let o = LoaderOptions {
            resolution: 256,
            batch_size: 4,
            prefetch: 4,
            num_threads: 4,
            ..LoaderOptions::default()
        };
        let loader = Loader::new(dir.path(), o).unwrap();
        let mut it = loader.iter_epoch(0, 0);
        assert!(it.next().unwrap().is_ok());
        assert!(
            Arc::strong_count(&loader.inner) > 2,
            "workers hold the loader"
        );
        let t = Instant::now();
        drop(it);
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        // Every worker's context is gone: the threads have exited and been joined.
        assert_eq!(Arc::strong_count(&loader.inner), 1);

        // Dropping before the first batch is consumed is just as prompt.
        let it = loader.iter_epoch(1, 0);
        let t = Instant::now();
        drop(it);
        assert!(t.elapsed() < Duration::from_secs(1));
        assert_eq!(Arc::strong_count(&loader.inner), 1);
    }
}
