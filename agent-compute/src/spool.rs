//! The on-disk spool: encoded batches waiting for the broker, oldest first.
//!
//! One file per batch, `<seq>-<samples>.batch` (20-digit sequence number, sample count),
//! holding the wire-format body (unsigned: it is signed when sent, so a changed secret
//! applies to the backlog too). A batch is written to a temporary file, fsynced and renamed,
//! so a crash never leaves half a batch; leftover temporary files are removed at start. The
//! spool is bounded by `max_bytes`: when a new batch does not fit, the oldest batches are
//! deleted and their samples counted as dropped (`spool_full`). It survives restarts: the
//! directory is scanned at start and the backlog is sent in order.

use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};

/// One spooled batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub seq: u64,
    pub samples: u64,
    pub bytes: u64,
}

impl Entry {
    fn file_name(&self) -> String {
        format!("{:020}-{}.batch", self.seq, self.samples)
    }
}

/// Why the spool could not do its job (the caller logs it; the batch then stays in memory
/// for this cycle only).
#[derive(Debug, thiserror::Error)]
#[error("spool {path}: {source}")]
pub struct SpoolError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// See the module doc.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    entries: VecDeque<Entry>,
    bytes: u64,
    next_seq: u64,
}

impl Spool {
    /// Opens (creating) `dir` and indexes the batches already there.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self, SpoolError> {
        let err = |source| SpoolError {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(err)?;
        let mut entries = Vec::new();
        for e in std::fs::read_dir(dir).map_err(err)? {
            let e = e.map_err(err)?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") {
                let _ = std::fs::remove_file(e.path());
                continue;
            }
            let Some(stem) = name.strip_suffix(".batch") else {
                continue;
            };
            let Some((seq, samples)) = stem.split_once('-') else {
                continue;
            };
            let (Ok(seq), Ok(samples)) = (seq.parse::<u64>(), samples.parse::<u64>()) else {
                continue;
            };
            let bytes = e.metadata().map_err(err)?.len();
            entries.push(Entry {
                seq,
                samples,
                bytes,
            });
        }
        entries.sort_by_key(|e| e.seq);
        let bytes = entries.iter().map(|e| e.bytes).sum();
        let next_seq = entries.last().map_or(0, |e| e.seq + 1);
        Ok(Spool {
            dir: dir.to_path_buf(),
            max_bytes,
            entries: entries.into(),
            bytes,
            next_seq,
        })
    }

    /// Batches waiting.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes on disk.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Samples waiting.
    pub fn samples(&self) -> u64 {
        self.entries.iter().map(|e| e.samples).sum()
    }

    /// Appends a batch of `samples` samples. Returns the entries evicted to make room
    /// (oldest first), whose samples are lost.
    pub fn push(&mut self, body: &[u8], samples: u64) -> Result<Vec<Entry>, SpoolError> {
        let entry = Entry {
            seq: self.next_seq,
            samples,
            bytes: body.len() as u64,
        };
        let path = self.dir.join(entry.file_name());
        let tmp = path.with_extension("tmp");
        let err = |source| SpoolError {
            path: tmp.clone(),
            source,
        };
        {
            // A full disk, as the fault-injection tests make it.
            fail::fail_point!("agent-spool-write-error", |_| Err(err(
                std::io::Error::from_raw_os_error(28)
            )));
            let mut f = std::fs::File::create(&tmp).map_err(err)?;
            let (head, tail) = body.split_at(body.len() / 2);
            f.write_all(head).map_err(err)?;
            // A crash here leaves half a temporary file, which the next start removes.
            fail::fail_point!("agent-spool-mid-write", |_| std::process::abort());
            f.write_all(tail).map_err(err)?;
            f.sync_data().map_err(err)?;
        }
        std::fs::rename(&tmp, &path).map_err(err)?;
        self.next_seq += 1;
        self.bytes += entry.bytes;
        self.entries.push_back(entry);
        let mut evicted = Vec::new();
        // Never evict the batch just written: a single batch larger than the limit stays.
        while self.bytes > self.max_bytes && self.entries.len() > 1 {
            let old = self.entries.pop_front().expect("len > 1");
            self.remove_file(&old);
            evicted.push(old);
        }
        Ok(evicted)
    }

    /// The `n` oldest batches and their bodies, oldest first. Stops before the first file
    /// that cannot be read; if that is the oldest, returns its error (see
    /// [`discard_front`](Self::discard_front)).
    pub fn first(&self, n: usize) -> Result<Vec<(Entry, Vec<u8>)>, SpoolError> {
        let mut out = Vec::new();
        for e in self.entries.iter().take(n) {
            let path = self.dir.join(e.file_name());
            match std::fs::read(&path) {
                Ok(body) => out.push((e.clone(), body)),
                Err(source) if out.is_empty() => return Err(SpoolError { path, source }),
                Err(_) => break,
            }
        }
        Ok(out)
    }

    /// Gives up the oldest batch (its file cannot be read); returns it so that the caller
    /// counts its samples as lost.
    pub fn discard_front(&mut self) -> Option<Entry> {
        let e = self.entries.pop_front()?;
        self.remove_file(&e);
        Some(e)
    }

    /// Removes the oldest batch (it was confirmed by the broker).
    pub fn pop_front(&mut self) {
        self.discard_front();
    }

    fn remove_file(&mut self, e: &Entry) {
        self.bytes = self.bytes.saturating_sub(e.bytes);
        if let Err(err) = std::fs::remove_file(self.dir.join(e.file_name())) {
            tracing::warn!(error = %err, seq = e.seq, "Could not delete a spooled batch file.");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vmeter-spool-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn fifo_survives_reopen() {
        let d = dir("fifo");
        let mut s = Spool::open(&d, 1 << 20).unwrap();
        s.push(b"one", 1).unwrap();
        s.push(b"two", 2).unwrap();
        std::fs::write(d.join("00000000000000000007-1.tmp"), b"half").unwrap();
        drop(s);
        let mut s = Spool::open(&d, 1 << 20).unwrap();
        assert_eq!((s.len(), s.samples(), s.bytes()), (2, 3, 6));
        assert!(
            !d.join("00000000000000000007-1.tmp").exists(),
            "temporary files removed"
        );
        assert_eq!(s.first(1).unwrap()[0].1, b"one");
        s.pop_front();
        s.push(b"three", 3).unwrap();
        let (e, body) = s.first(1).unwrap().remove(0);
        assert_eq!((e.seq, body.as_slice()), (1, b"two".as_slice()));
        s.pop_front();
        assert_eq!(
            s.first(1).unwrap()[0].0.seq,
            2,
            "sequence continues after reopen"
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn bounded_drops_oldest_and_reports_them() {
        let d = dir("bound");
        let mut s = Spool::open(&d, 10).unwrap();
        assert!(s.push(b"aaaa", 4).unwrap().is_empty());
        assert!(s.push(b"bbbb", 4).unwrap().is_empty());
        let evicted = s.push(b"cccc", 4).unwrap();
        assert_eq!(evicted.len(), 1);
        assert_eq!((evicted[0].seq, evicted[0].samples), (0, 4));
        assert_eq!((s.len(), s.bytes()), (2, 8));
        assert_eq!(s.first(1).unwrap()[0].1, b"bbbb");
        assert_eq!(
            std::fs::read_dir(&d).unwrap().count(),
            2,
            "evicted file deleted"
        );
        let _ = std::fs::remove_dir_all(&d);
    }
}
