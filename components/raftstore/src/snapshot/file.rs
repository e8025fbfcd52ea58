//! Region snapshots as files: how a snapshot travels between nodes.
//!
//! A raft `MsgSnapshot` carries no region data, only a [`Descriptor`] of
//! a file (its region, the applied index and term it was taken at, its
//! size and CRC-32). The data — the record stream of the parent module's
//! format — is written to a file by a generator thread on the leader's
//! node (`snapshot::generate_into`), streamed to the follower's node in
//! chunks by the [`crate::Transport`], written there through a
//! [`SnapshotSink`] (size and checksum checked, fsynced, renamed into
//! place), and only then is the raft message handed to the replica, which
//! reads the file to validate and install it. A region of any size is
//! thus never one message, and neither side holds it in memory to send or
//! receive it.
//!
//! Files live in the node's `snap/` directory ([`SnapDir`]):
//! `<region>_<term>_<index>.gen` generated here, `.recv` received here
//! (`.<n>.tmp` while arriving). A snapshot is identified by region, applied
//! term and index: by raft's log matching property two files with the same
//! three describe the same state. The directory is emptied when the node
//! starts (a leader generates again, and a follower asks again), but for
//! the received files of installs a crash cut short, which start-up
//! finishes from them (see `install`); a received file is deleted once
//! installed or refused, a generated one once a newer one replaces it or
//! its replica stops.
//!
//! Descriptor encoding (big-endian): `b"MSRF" | version u8 = 1 |
//! region_id u64 | index u64 | term u64 | size u64 | crc32 u32`.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::warn;

use crate::{Error, Result};

const DESCRIPTOR_MAGIC: &[u8] = b"MSRF";
const DESCRIPTOR_VERSION: u8 = 1;
const DESCRIPTOR_LEN: usize = 4 + 1 + 8 * 4 + 4;

/// Numbers the temporary files of the process, so no two writers share one.
static TEMP_FILES: AtomicU64 = AtomicU64::new(0);

/// What a raft snapshot message says of the file carrying its data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor {
    pub region_id: u64,
    pub index: u64,
    pub term: u64,
    pub size: u64,
    pub crc32: u32,
}

impl Descriptor {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(DESCRIPTOR_LEN);
        out.extend_from_slice(DESCRIPTOR_MAGIC);
        out.push(DESCRIPTOR_VERSION);
        for n in [self.region_id, self.index, self.term, self.size] {
            out.extend_from_slice(&n.to_be_bytes());
        }
        out.extend_from_slice(&self.crc32.to_be_bytes());
        out
    }

    /// Whether `data` (a raft snapshot's data) is a descriptor rather than
    /// inline region data (what nodes of an older version send).
    pub fn is_descriptor(data: &[u8]) -> bool {
        data.starts_with(DESCRIPTOR_MAGIC)
    }

    pub fn decode(data: &[u8]) -> Result<Descriptor> {
        let bad = |what: &str| Error::Corrupted(format!("snapshot descriptor: {what}"));
        if data.len() != DESCRIPTOR_LEN || !Self::is_descriptor(data) {
            return Err(bad("malformed"));
        }
        if data[4] != DESCRIPTOR_VERSION {
            return Err(bad("unknown version"));
        }
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&data[at..at + 8]);
            u64::from_be_bytes(b)
        };
        let mut crc = [0u8; 4];
        crc.copy_from_slice(&data[37..41]);
        Ok(Descriptor {
            region_id: u64_at(5),
            index: u64_at(13),
            term: u64_at(21),
            size: u64_at(29),
            crc32: u32::from_be_bytes(crc),
        })
    }

    fn stem(&self) -> String {
        format!("{}_{}_{}", self.region_id, self.term, self.index)
    }
}

/// A node's snapshot directory (see the module docs).
#[derive(Clone, Debug)]
pub struct SnapDir {
    path: PathBuf,
}

impl SnapDir {
    /// Opens `path`, creating it, and deletes whatever an earlier run left
    /// there but the files named in `keep` (those of installs to finish).
    pub fn open(path: &Path, keep: &[String]) -> Result<SnapDir> {
        fs::create_dir_all(path)?;
        for entry in fs::read_dir(path)? {
            let entry = entry?;
            if keep.iter().any(|k| entry.file_name() == k.as_str()) {
                continue;
            }
            if entry.file_type()?.is_dir() {
                fs::remove_dir_all(entry.path())?;
            } else {
                fs::remove_file(entry.path())?;
            }
        }
        Ok(SnapDir {
            path: path.to_owned(),
        })
    }

    /// Where the snapshot this node generated for `desc` is.
    pub fn generated(&self, desc: &Descriptor) -> PathBuf {
        self.path.join(format!("{}.gen", desc.stem()))
    }

    /// Where a snapshot received for `desc` is, once complete.
    pub fn received(&self, desc: &Descriptor) -> PathBuf {
        self.path.join(Self::received_name(desc))
    }

    /// The file name of [`SnapDir::received`].
    pub fn received_name(desc: &Descriptor) -> String {
        format!("{}.recv", desc.stem())
    }

    /// A new file for a generator of region `region_id` to write to (no
    /// other generator's, even of a replica of the region started anew);
    /// it becomes [`SnapDir::generated`] through [`SnapDir::publish`].
    pub(crate) fn generating(&self, region_id: u64) -> PathBuf {
        let n = TEMP_FILES.fetch_add(1, Ordering::Relaxed);
        self.path.join(format!("{region_id}_gen.{n}.tmp"))
    }

    /// Moves a generated file into place under its descriptor's name.
    pub(crate) fn publish(&self, tmp: &Path, desc: &Descriptor) -> Result<PathBuf> {
        let path = self.generated(desc);
        fs::rename(tmp, &path)?;
        Ok(path)
    }

    /// Starts receiving the file of `desc`. Two receptions of one
    /// snapshot at once (a resend while the first was still arriving)
    /// write to files of their own; either may complete it.
    pub fn sink(&self, desc: Descriptor) -> Result<SnapshotSink> {
        let n = TEMP_FILES.fetch_add(1, Ordering::Relaxed);
        let tmp = self.path.join(format!("{}.{n}.tmp", desc.stem()));
        let file = File::create(&tmp)?;
        Ok(SnapshotSink {
            out: BufWriter::new(file),
            hasher: crc32fast::Hasher::new(),
            written: 0,
            desc,
            tmp,
            path: self.received(&desc),
        })
    }
}

/// Deletes a snapshot file that is no longer needed; a failure is only
/// logged (the directory is emptied at the next start anyway).
pub(crate) fn remove(path: &Path) {
    if let Err(e) = fs::remove_file(path) {
        if e.kind() != io::ErrorKind::NotFound {
            warn!(path = %path.display(), "cannot delete a snapshot file: {e}");
        }
    }
}

/// A snapshot file being received, chunk by chunk.
pub struct SnapshotSink {
    out: BufWriter<File>,
    hasher: crc32fast::Hasher,
    written: u64,
    desc: Descriptor,
    tmp: PathBuf,
    path: PathBuf,
}

impl SnapshotSink {
    /// Appends `chunk`; fails (and the file is dropped) if the file grows
    /// past the descriptor's size.
    pub fn write(&mut self, chunk: &[u8]) -> Result<()> {
        self.written += chunk.len() as u64;
        if self.written > self.desc.size {
            return Err(Error::Corrupted(format!(
                "region {} snapshot larger than its descriptor says ({} bytes)",
                self.desc.region_id, self.desc.size
            )));
        }
        self.hasher.update(chunk);
        self.out.write_all(chunk)?;
        Ok(())
    }

    /// Checks size and checksum, syncs the file and moves it to
    /// [`SnapDir::received`]; returns that path.
    pub fn finish(mut self) -> Result<PathBuf> {
        let crc = std::mem::take(&mut self.hasher).finalize();
        if self.written != self.desc.size || crc != self.desc.crc32 {
            return Err(Error::Corrupted(format!(
                "region {} snapshot: {} bytes with checksum {crc:08x}, expected {} with {:08x}",
                self.desc.region_id, self.written, self.desc.size, self.desc.crc32
            )));
        }
        self.out.flush()?;
        self.out.get_ref().sync_all()?;
        fs::rename(&self.tmp, &self.path)?;
        Ok(self.path.clone())
    }
}

impl Drop for SnapshotSink {
    /// An unfinished file goes (after `finish`, `tmp` no longer exists).
    fn drop(&mut self) {
        remove(&self.tmp);
    }
}

/// A writer that counts and checksums what goes through it.
pub(crate) struct Checksummed<W> {
    pub inner: W,
    pub hasher: crc32fast::Hasher,
    pub written: u64,
}

impl<W: Write> Checksummed<W> {
    pub fn new(inner: W) -> Self {
        Checksummed {
            inner,
            hasher: crc32fast::Hasher::new(),
            written: 0,
        }
    }
}

impl<W: Write> Write for Checksummed<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(data: &[u8]) -> Descriptor {
        Descriptor {
            region_id: 7,
            index: 12,
            term: 3,
            size: data.len() as u64,
            crc32: crc32fast::hash(data),
        }
    }

    #[test]
    fn descriptors_round_trip_and_reject_garbage() {
        let d = desc(b"hello");
        let raw = d.encode();
        assert!(Descriptor::is_descriptor(&raw));
        assert_eq!(Descriptor::decode(&raw).unwrap(), d);
        for n in 0..raw.len() {
            assert!(Descriptor::decode(&raw[..n]).is_err());
        }
        let mut other = raw.clone();
        other[4] = 9;
        assert!(Descriptor::decode(&other).is_err());
        assert!(!Descriptor::is_descriptor(b"MSRS\x04"));
    }

    #[test]
    fn a_sink_keeps_only_a_whole_file_with_the_right_checksum() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = SnapDir::open(&tmp.path().join("snap"), &[]).unwrap();
        let data = b"0123456789";
        let d = desc(data);
        let mut sink = dir.sink(d).unwrap();
        sink.write(&data[..4]).unwrap();
        sink.write(&data[4..]).unwrap();
        let path = sink.finish().unwrap();
        assert_eq!(path, dir.received(&d));
        assert_eq!(fs::read(&path).unwrap(), data);

        // Too long, too short, or a flipped byte: nothing is kept.
        let mut sink = dir.sink(d).unwrap();
        assert!(sink.write(b"0123456789x").is_err());
        drop(sink);
        let mut sink = dir.sink(d).unwrap();
        sink.write(b"01234").unwrap();
        assert!(sink.finish().is_err());
        let mut sink = dir.sink(d).unwrap();
        sink.write(b"0123456788").unwrap();
        assert!(sink.finish().is_err());
        let left: Vec<_> = fs::read_dir(tmp.path().join("snap"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("7_3_12.recv")]);

        // Reopening empties the directory, but for the files to keep.
        fs::write(tmp.path().join("snap/7_3_13.recv"), b"x").unwrap();
        fs::write(tmp.path().join("snap/7_3_14.gen"), b"x").unwrap();
        SnapDir::open(&tmp.path().join("snap"), &["7_3_12.recv".to_string()]).unwrap();
        let left: Vec<_> = fs::read_dir(tmp.path().join("snap"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("7_3_12.recv")]);
        SnapDir::open(&tmp.path().join("snap"), &[]).unwrap();
        assert_eq!(fs::read_dir(tmp.path().join("snap")).unwrap().count(), 0);
    }
}
