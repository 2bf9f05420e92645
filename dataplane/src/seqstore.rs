//! The gateway's state directory: durable sequence-number reservations for static-key SAs
//! (see [`espada_sadb::seqguard`]) and the locks that keep two gateways off the same state and
//! the same interfaces.
//!
//! File `<dir>/<gateway>.seq`, one line per outbound SA: `<spi in hex> <highest reserved
//! sequence number>`. It is rewritten whole (temporary file, `fsync`, `rename`, `fsync` of the
//! directory) *before* a new limit is granted to the workers, so after any crash the next run
//! starts above every number the previous one could have used. A run that cannot write it does
//! not start; a run that stops being able to write it stops sending (`seq-unreserved` drops)
//! instead of risking a nonce.
//!
//! Locks are `flock(2)` on files, released by the kernel when the process dies (`kill -9`
//! included): `<dir>/<gateway>.lock` for the state, and `/run/espada/<netns>-<iface>.lock` per
//! interface, `<netns>` being the network namespace's inode so that the same interface name in
//! two namespaces (the lab) is two interfaces.
#![allow(unsafe_code)]

use espada_sadb::SeqGuard;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Sequence numbers reserved per SA at a time. A restart skips at most this many numbers per
/// SA; the writer runs every few tens of milliseconds and extends a reservation when less than
/// half is left, so one block covers ~0.4 s of 10 Mpps on one SA.
pub const DEFAULT_BLOCK: u64 = 1 << 22;

/// An exclusive advisory lock held for the life of the value.
#[derive(Debug)]
pub struct LockFile {
    _file: File,
    path: PathBuf,
}

impl LockFile {
    /// Takes the lock at `path` without waiting; `what` names the thing locked in the error.
    pub fn take(path: &Path, what: &str) -> io::Result<LockFile> {
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        // SAFETY: flock on a descriptor we own.
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let holder = std::fs::read_to_string(path).unwrap_or_default();
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "{what} is held by another espada ({}; lock {})",
                        holder
                            .trim()
                            .trim_start_matches("pid ")
                            .parse::<u32>()
                            .map_or("pid unknown".to_string(), |p| format!("pid {p}")),
                        path.display()
                    ),
                ));
            }
            return Err(io::Error::new(e.kind(), format!("{}: {e}", path.display())));
        }
        file.set_len(0)?;
        let _ = writeln!(file, "pid {}", std::process::id());
        Ok(LockFile {
            _file: file,
            path: path.to_path_buf(),
        })
    }

    /// Where the lock lives.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Locks interface `iface` of this process's network namespace under `run_dir` (normally
/// `/run/espada`): a second gateway on the same interface is refused.
pub fn lock_interface(run_dir: &Path, iface: &str) -> io::Result<LockFile> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(run_dir)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", run_dir.display())))?;
    let ns = std::fs::metadata("/proc/self/ns/net").map_or(0, |m| m.ino());
    let safe: String = iface
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    LockFile::take(
        &run_dir.join(format!("{ns}-{safe}.lock")),
        &format!("interface {iface}"),
    )
}

/// The durable reservations of one gateway.
#[derive(Debug)]
pub struct SeqStore {
    file: PathBuf,
    _lock: LockFile,
    block: u64,
    /// Limits from the previous run, by SPI.
    previous: BTreeMap<u32, u64>,
    guards: BTreeMap<u32, (Arc<SeqGuard>, u64)>,
    /// Limits as last written.
    written: BTreeMap<u32, u64>,
    write_errors: u64,
}

impl SeqStore {
    /// Opens (creating) the state of gateway `name` in `dir`, locked against a second gateway.
    pub fn open(dir: &Path, name: &str, block: u64) -> io::Result<SeqStore> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| {
                io::Error::new(e.kind(), format!("state directory {}: {e}", dir.display()))
            })?;
        let lock = LockFile::take(
            &dir.join(format!("{name}.lock")),
            &format!("the state of gateway {name:?} in {}", dir.display()),
        )?;
        let file = dir.join(format!("{name}.seq"));
        let mut previous = BTreeMap::new();
        match std::fs::read_to_string(&file) {
            Ok(text) => {
                for (i, line) in text.lines().enumerate() {
                    let line = line.trim();
                    if line.is_empty() || line.starts_with('#') {
                        continue;
                    }
                    let mut it = line.split_whitespace();
                    let parsed = (|| {
                        let spi =
                            u32::from_str_radix(it.next()?.trim_start_matches("0x"), 16).ok()?;
                        let lim = it.next()?.parse::<u64>().ok()?;
                        Some((spi, lim))
                    })();
                    match parsed {
                        Some((spi, lim)) => {
                            previous.insert(spi, lim);
                        }
                        // A damaged state file cannot be trusted to bound what was sent.
                        None => {
                            return Err(io::Error::new(
                                io::ErrorKind::InvalidData,
                                format!(
                                    "{}:{}: expected `<spi hex> <sequence number>`, got {line:?} (remove the file only if every key of this gateway has changed since)",
                                    file.display(),
                                    i + 1
                                ),
                            ))
                        }
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", file.display()))),
        }
        Ok(SeqStore {
            file,
            _lock: lock,
            block: block.max(64),
            written: previous.clone(),
            previous,
            guards: BTreeMap::new(),
            write_errors: 0,
        })
    }

    /// The guard for outbound SA `spi` whose sequence space ends at `max` (one per SPI: SAs
    /// sharing an SPI share it). It resumes after the previous run's limit.
    pub fn guard(&mut self, spi: u32, max: u64) -> Arc<SeqGuard> {
        let prev = self.previous.get(&spi).copied().unwrap_or(0);
        self.guards
            .entry(spi)
            .or_insert_with(|| (Arc::new(SeqGuard::new(spi, prev)), max))
            .0
            .clone()
    }

    /// Where SA `spi` resumes (the previous run's limit), for reports.
    pub fn resumes_after(&self, spi: u32) -> u64 {
        self.previous.get(&spi).copied().unwrap_or(0)
    }

    /// Extends every reservation that is within half a block of its end: writes the new limits
    /// durably, then grants them. Returns how many SAs were extended. On a write error nothing
    /// is granted (the workers stop at the old limits) and the error is returned.
    pub fn advance(&mut self) -> io::Result<usize> {
        let mut want = Vec::new();
        for (spi, (g, max)) in &self.guards {
            if let Some(l) = g.wants(self.block, *max) {
                want.push((*spi, l));
            }
        }
        if want.is_empty() {
            return Ok(0);
        }
        let mut next = self.written.clone();
        for (spi, l) in &want {
            let e = next.entry(*spi).or_insert(0);
            *e = (*e).max(*l);
        }
        if let Err(e) = self.write(&next) {
            self.write_errors += 1;
            return Err(e);
        }
        self.written = next;
        for (spi, l) in &want {
            self.guards[spi].0.grant(*l);
        }
        Ok(want.len())
    }

    /// Failed writes so far.
    pub fn write_errors(&self) -> u64 {
        self.write_errors
    }

    /// The state file.
    pub fn path(&self) -> &Path {
        &self.file
    }

    fn write(&self, limits: &BTreeMap<u32, u64>) -> io::Result<()> {
        let dir = self.file.parent().unwrap_or(Path::new("."));
        let tmp = self.file.with_extension("seq.tmp");
        let mut text = String::from(
            "# espada: highest sequence number reserved per outbound SPI (never edit down)\n",
        );
        for (spi, l) in limits {
            text.push_str(&format!("{spi:#010x} {l}\n"));
        }
        let ctx = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", tmp.display()));
        {
            let mut f = OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(ctx)?;
            f.write_all(text.as_bytes()).map_err(ctx)?;
            f.sync_all().map_err(ctx)?;
        }
        std::fs::rename(&tmp, &self.file)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", self.file.display())))?;
        File::open(dir).and_then(|d| d.sync_all())?;
        Ok(())
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn reservations_survive_a_restart_and_only_grow() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SeqStore::open(dir.path(), "west", 1000).unwrap();
        let g = s.guard(0x1001, u32::MAX as u64);
        assert_eq!(g.limit(), 0);
        assert_eq!(s.advance().unwrap(), 1);
        assert_eq!(g.limit(), 1000);
        assert_eq!(s.advance().unwrap(), 0, "half a block is still left");
        g.note_used(700);
        assert_eq!(s.advance().unwrap(), 1);
        assert_eq!(g.limit(), 1700);
        // A second gateway on the same state is refused while the first holds it.
        let e = SeqStore::open(dir.path(), "west", 1000).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        assert!(e.to_string().contains("held by another espada"), "{e}");
        drop(s);
        // The next run resumes above everything the first could have used.
        let mut s = SeqStore::open(dir.path(), "west", 1000).unwrap();
        assert_eq!(s.resumes_after(0x1001), 1700);
        let g = s.guard(0x1001, u32::MAX as u64);
        assert_eq!((g.used(), g.limit()), (1700, 1700));
        s.advance().unwrap();
        assert_eq!(g.limit(), 2700);
    }

    #[test]
    fn a_damaged_state_file_is_refused_with_its_line() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("east.seq"), "0x1001 5\nnonsense\n").unwrap();
        let e = SeqStore::open(dir.path(), "east", 1000).unwrap_err();
        assert!(e.to_string().contains("east.seq:2:"), "{e}");
    }

    #[test]
    fn an_unwritable_state_is_an_error_not_a_grant() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SeqStore::open(dir.path(), "west", 1000).unwrap();
        let g = s.guard(7, u32::MAX as u64);
        // A directory where the file must go makes the rename fail.
        std::fs::create_dir(dir.path().join("west.seq")).unwrap();
        std::fs::write(dir.path().join("west.seq").join("x"), "").unwrap();
        assert!(s.advance().is_err());
        assert_eq!(g.limit(), 0, "nothing granted that is not written");
        assert_eq!(s.write_errors(), 1);
    }

    #[test]
    fn interfaces_are_locked_per_namespace() {
        let dir = tempfile::tempdir().unwrap();
        let a = lock_interface(dir.path(), "black0").unwrap();
        let e = lock_interface(dir.path(), "black0").unwrap_err();
        assert!(
            e.to_string()
                .contains("interface black0 is held by another espada"),
            "{e}"
        );
        assert!(lock_interface(dir.path(), "red0").is_ok());
        drop(a);
        assert!(lock_interface(dir.path(), "black0").is_ok());
    }
}
