//! JSON lines written off the request path, for the audit log and the request log.
//!
//! [`JsonLines::push`] hands a line to a bounded channel with `try_send` and returns
//! at once; a writer thread turns lines into JSON and writes them out, flushing
//! whenever the queue runs empty. A full queue drops the line and counts it; the next
//! flush writes a line saying how many were lost (built by the log's own
//! `dropped_line`). A file is rotated by size between two lines: `log` becomes
//! `log.1`, `log.1` becomes `log.2`, and so on up to [`Rotation::keep`] old files, so a
//! log never takes more than `(keep + 1) × max_bytes` (plus one line) of disk.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

/// How a log file is rotated.
#[derive(Clone, Copy, Debug)]
pub struct Rotation {
    /// Rotate once the file reaches this many bytes.
    pub max_bytes: u64,
    /// Rotated files kept (`log.1` … `log.N`); older ones are deleted.
    pub keep: u32,
}

impl Default for Rotation {
    fn default() -> Self {
        Rotation {
            max_bytes: 64 << 20,
            keep: 3,
        }
    }
}

/// The longest [`JsonLines::flush`] waits for the writer.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// Lines of type `T` on their way to a writer thread. Cloning gives another handle on
/// the same writer; `JsonLines::default()` discards everything.
pub struct JsonLines<T> {
    inner: Option<Arc<Inner<T>>>,
}

impl<T> Default for JsonLines<T> {
    fn default() -> Self {
        JsonLines { inner: None }
    }
}

impl<T> Clone for JsonLines<T> {
    fn clone(&self) -> Self {
        JsonLines {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<T> {
    queue: SyncSender<Message<T>>,
    capacity: usize,
    counts: Arc<Counts>,
    destination: String,
}

#[derive(Default)]
struct Counts {
    /// Lines sent and not yet taken by the writer.
    queued: AtomicUsize,
    written: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
}

enum Message<T> {
    Line(Box<T>),
    /// Write and flush everything before this, then answer.
    Flush(SyncSender<()>),
}

/// Where the writer thread writes: standard output, or a file it rotates.
enum Sink {
    Stream(BufWriter<Box<dyn Write + Send>>),
    File {
        out: BufWriter<File>,
        path: PathBuf,
        size: u64,
        rotation: Rotation,
    },
}

impl<T: Serialize + Send + 'static> JsonLines<T> {
    /// Append to the file at `path` (created if missing), rotated by `rotation`.
    pub fn to_file(
        path: &Path,
        rotation: Rotation,
        capacity: usize,
        dropped_line: fn(u64) -> T,
    ) -> io::Result<Self> {
        let file = open_append(path)?;
        let size = file.metadata()?.len();
        let sink = Sink::File {
            out: BufWriter::new(file),
            path: path.to_owned(),
            size,
            rotation,
        };
        Self::start(sink, path.display().to_string(), capacity, dropped_line)
    }

    /// Write to `out` (standard output, say), never rotated.
    pub fn to_writer(
        out: Box<dyn Write + Send>,
        destination: String,
        capacity: usize,
        dropped_line: fn(u64) -> T,
    ) -> io::Result<Self> {
        let sink = Sink::Stream(BufWriter::new(out));
        Self::start(sink, destination, capacity, dropped_line)
    }

    fn start(
        sink: Sink,
        destination: String,
        capacity: usize,
        dropped_line: fn(u64) -> T,
    ) -> io::Result<Self> {
        let (queue, lines) = sync_channel(capacity);
        let counts = Arc::new(Counts::default());
        let writer_counts = Arc::clone(&counts);
        std::thread::Builder::new()
            .name("jsonl-writer".into())
            .spawn(move || write_lines(lines, sink, &writer_counts, dropped_line))?;
        Ok(JsonLines {
            inner: Some(Arc::new(Inner {
                queue,
                capacity,
                counts,
                destination,
            })),
        })
    }

    /// Whether lines go anywhere.
    pub fn is_on(&self) -> bool {
        self.inner.is_some()
    }

    /// Where lines go: a path, `stdout`, or `off`.
    pub fn destination(&self) -> &str {
        self.inner
            .as_ref()
            .map_or("off", |i| i.destination.as_str())
    }

    /// Lines written so far.
    pub fn written(&self) -> u64 {
        self.count(|c| &c.written)
    }

    /// Lines dropped because the queue was full (or the writer gone).
    pub fn dropped(&self) -> u64 {
        self.count(|c| &c.dropped)
    }

    /// Lines the writer failed to write (an I/O error).
    pub fn failed(&self) -> u64 {
        self.count(|c| &c.failed)
    }

    fn count(&self, which: impl Fn(&Counts) -> &AtomicU64) -> u64 {
        self.inner
            .as_ref()
            .map_or(0, |i| which(&i.counts).load(Ordering::Relaxed))
    }

    /// Queue a line; never waits. False if it was dropped.
    pub fn push(&self, line: T) -> bool {
        self.push_within(line, usize::MAX)
    }

    /// Queue a line only while fewer than `share` parts in 1,000 of the queue are
    /// taken: lines that anyone can cause (refused requests) use part of the queue
    /// and leave the rest to the lines that must not be lost.
    pub fn push_within(&self, line: T, share: usize) -> bool {
        let Some(inner) = &self.inner else {
            return true;
        };
        let room = inner.capacity.saturating_mul(share.min(1000)) / 1000;
        let counts = &inner.counts;
        if share < 1000 && counts.queued.load(Ordering::Relaxed) >= room {
            counts.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        counts.queued.fetch_add(1, Ordering::Relaxed);
        match inner.queue.try_send(Message::Line(Box::new(line))) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                counts.queued.fetch_sub(1, Ordering::Relaxed);
                counts.dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Wait (up to 10 s) until every line queued before this call is written and
    /// flushed. Blocks the calling thread: for shutdown, not for requests.
    pub fn flush(&self) {
        let Some(inner) = &self.inner else { return };
        let deadline = Instant::now() + FLUSH_TIMEOUT;
        let (done, finished) = sync_channel(1);
        let mut message = Message::Flush(done);
        // The queue may be full: wait for room rather than drop the flush.
        loop {
            match inner.queue.try_send(message) {
                Ok(()) => break,
                Err(TrySendError::Full(m)) if Instant::now() < deadline => {
                    message = m;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(_) => {
                    eprintln!(
                        "{}: could not flush (writer busy or gone)",
                        inner.destination
                    );
                    return;
                }
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if finished.recv_timeout(left).is_err() {
            eprintln!(
                "{}: flush did not finish within {FLUSH_TIMEOUT:?}",
                inner.destination
            );
        }
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// `log` → `log.1` → … → `log.keep`; the oldest is deleted.
fn rotate(path: &Path, keep: u32) -> io::Result<()> {
    let numbered = |n: u32| {
        let mut name = path.as_os_str().to_owned();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    };
    if keep == 0 {
        return std::fs::remove_file(path);
    }
    for n in (1..keep).rev() {
        let from = numbered(n);
        if from.exists() {
            std::fs::rename(&from, numbered(n + 1))?;
        }
    }
    std::fs::rename(path, numbered(1))
}

impl Sink {
    fn out(&mut self) -> &mut dyn Write {
        match self {
            Sink::Stream(out) => out,
            Sink::File { out, .. } => out,
        }
    }

    /// Write one line; then rotate if the file has reached its size.
    fn write_line(&mut self, line: &impl Serialize) -> io::Result<()> {
        let mut bytes = serde_json::to_vec(line)?;
        bytes.push(b'\n');
        self.out().write_all(&bytes)?;
        if let Sink::File {
            out,
            path,
            size,
            rotation,
        } = self
        {
            *size += bytes.len() as u64;
            if *size >= rotation.max_bytes {
                out.flush()?;
                rotate(path, rotation.keep)?;
                *out = BufWriter::new(open_append(path)?);
                *size = 0;
            }
        }
        Ok(())
    }
}

/// The writer thread: lines until every handle is gone.
fn write_lines<T: Serialize>(
    lines: Receiver<Message<T>>,
    mut sink: Sink,
    counts: &Counts,
    dropped_line: fn(u64) -> T,
) {
    let mut reported_drops = 0;
    loop {
        let message = match lines.try_recv() {
            Ok(message) => message,
            Err(TryRecvError::Empty) => {
                let _ = sink.out().flush();
                match lines.recv() {
                    Ok(message) => message,
                    Err(_) => break,
                }
            }
            Err(TryRecvError::Disconnected) => break,
        };
        match message {
            Message::Line(line) => {
                counts.queued.fetch_sub(1, Ordering::Relaxed);
                write_counted(&mut sink, &*line, counts);
            }
            Message::Flush(done) => {
                let dropped = counts.dropped.load(Ordering::Relaxed);
                if dropped > reported_drops {
                    write_counted(&mut sink, &dropped_line(dropped - reported_drops), counts);
                    reported_drops = dropped;
                }
                if let Err(e) = sink.out().flush() {
                    eprintln!("log flush failed: {e}");
                }
                let _ = done.send(());
            }
        }
    }
    let _ = sink.out().flush();
}

fn write_counted(sink: &mut Sink, line: &impl Serialize, counts: &Counts) {
    match sink.write_line(line) {
        Ok(()) => {
            counts.written.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => {
            // Said once; the count tells the rest.
            if counts.failed.fetch_add(1, Ordering::Relaxed) == 0 {
                eprintln!("log write failed: {e}");
            }
        }
    }
}
