//! The gateway's state directory: durable sequence-number reservations for static-key SAs
//! (see [`espada_sadb::seqguard`]), and the locks that keep two gateways off the same state and
//! the same interfaces.
//!
//! File `<dir>/<gateway>.seq`: a header line `espada-seq 2`, then one line per outbound key:
//! `<key fingerprint, 32 hex digits> <highest reserved sequence number> <spi in hex>`. A key is
//! named by its fingerprint ([`espada_sadb::db::key_fingerprint`], an HMAC of the key), not by
//! SPI, and every other gateway's file in the directory is read too: a renamed gateway or a
//! moved SPI resumes above what the key already sent. A new limit is durable *before* it is
//! granted to the workers, so after any crash the next run starts above every number the
//! previous one could have used: the limits that changed are appended (one line each, `fsync`),
//! and a later line for a key supersedes an earlier one (limits only grow). When the appended
//! lines outnumber the keys (or keys are pruned) the file is compacted: rewritten whole
//! (temporary file, `fsync`, `rename`, `fsync` of the directory). A gateway with 10 000 keys so
//! writes a few lines per extension, not 10 000. A crash in the middle of an append leaves a last
//! line without its newline: that line is ignored (its limit was never granted), and the next
//! write compacts the file. A run that cannot write it
//! does not start; a run that stops being able to write it stops sending (`seq-unreserved`
//! drops) instead of risking a nonce.
//!
//! A missing file means "never ran here": with static keys the gateway refuses that unless
//! told the keys are new (`espada run --new-keys`). A file without the header (a 0-byte file
//! included: the writer always writes one) is damage and is refused. The file holds the keys in
//! use and at most [`RETIRED_KEPT`] keys no longer in use; files are never opened through a
//! symbolic link.
//!
//! A version-1 file (by SPI, written by espada before keys had fingerprints) is recognised by
//! its header line and carried over by SPI.
//!
//! Locks: `<dir>/<gateway>.lock` (`flock(2)`, released by the kernel when the process dies) for the
//! state; for each interface an abstract unix socket `@espada/<iface>`, which the kernel scopes
//! to the network namespace: a second espada on the same interface of the same namespace is
//! refused whatever directories, container or gateway name it was given.
#![allow(unsafe_code)]

use espada_sadb::db::{SaDb, SaSpec, TunnelSas};
use espada_sadb::SeqGuard;
use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Sequence numbers reserved per SA at a time. A restart skips at most this many numbers per
/// SA; the writer runs every few tens of milliseconds and extends a reservation when less than
/// half is left, so one block covers ~0.4 s of 10 Mpps on one SA.
pub const DEFAULT_BLOCK: u64 = 1 << 22;

/// Keys no longer used by any SA that the state file still remembers (the newest ones).
pub const RETIRED_KEPT: usize = 4096;

/// The state file's first line.
pub const HEADER: &str = "espada-seq 2";

/// The first line of a version-1 file.
pub const HEADER_V1: &str =
    "# espada: highest sequence number reserved per outbound SPI (never edit down)";

fn ctx(path: &Path) -> impl Fn(io::Error) -> io::Error + '_ {
    move |e| io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// Opens `path` without following a symbolic link in its last component.
fn open_nofollow(o: &mut OpenOptions, path: &Path) -> io::Result<File> {
    o.custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{}: is a symbolic link; espada does not follow links for its state and locks", path.display()),
                )
            } else {
                ctx(path)(e)
            }
        })
}

/// An exclusive advisory lock held for the life of the value.
#[derive(Debug)]
pub struct LockFile {
    _file: File,
    path: PathBuf,
}

impl LockFile {
    /// Takes the lock at `path` without waiting; `what` names the thing locked in the error.
    /// The file goes away when the lock is let go (see `Drop`).
    pub fn take(path: &Path, what: &str) -> io::Result<LockFile> {
        // The holder before us removes the file as it lets go: if that happened between our
        // open and our lock, we hold a file nobody else will open. Then again, on the file the
        // path names now.
        for _ in 0..16 {
            let mut file = Self::try_take(path, what)?;
            let same = match (file.metadata(), std::fs::symlink_metadata(path)) {
                (Ok(a), Ok(b)) => {
                    use std::os::unix::fs::MetadataExt;
                    a.ino() == b.ino() && a.dev() == b.dev()
                }
                _ => false,
            };
            if same {
                file.set_len(0)?;
                let _ = writeln!(file, "pid {}", std::process::id());
                return Ok(LockFile {
                    _file: file,
                    path: path.to_path_buf(),
                });
            }
            // (closing it lets go of a lock on a file no longer at `path`)
        }
        Err(io::Error::other(format!(
            "{}: the lock file keeps being replaced (another espada starting and stopping?)",
            path.display()
        )))
    }

    fn try_take(path: &Path, what: &str) -> io::Result<File> {
        let file = open_nofollow(
            OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .mode(0o600),
            path,
        )?;
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
            return Err(ctx(path)(e));
        }
        Ok(file)
    }

    /// Where the lock lives.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for LockFile {
    /// Removes the file while the lock is still held (the descriptor closes after this), so
    /// no stale lock files stay behind; a process that opened it meanwhile sees the path
    /// change and tries again (see [`LockFile::take`]).
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The lock on one interface of this network namespace: an abstract unix socket bound for
/// the life of the value (the kernel releases it when the process dies, `kill -9` included).
#[derive(Debug)]
pub struct InterfaceLock {
    _sock: std::os::unix::net::UnixListener,
    name: String,
}

impl InterfaceLock {
    /// The abstract socket name (without the leading NUL).
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Locks interface `iface` of this process's network namespace: a second gateway on the same
/// interface of the same namespace is refused, whatever its directories or gateway name.
pub fn lock_interface(iface: &str) -> io::Result<InterfaceLock> {
    use std::os::linux::net::SocketAddrExt;
    let name = format!("espada/{iface}");
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    match std::os::unix::net::UnixListener::bind_addr(&addr) {
        Ok(sock) => Ok(InterfaceLock { _sock: sock, name }),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "interface {iface} is held by another espada in this network namespace (abstract socket @{name}; `ss -xlp | grep espada/` shows which process)"
            ),
        )),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("interface lock @{name}: {e}"),
        )),
    }
}

struct Reservation {
    guard: Arc<SeqGuard>,
    max: u64,
    spi: u32,
}

/// The durable reservations of one state directory.
pub struct SeqStore {
    file: PathBuf,
    _lock: LockFile,
    block: u64,
    /// The state file did not exist: this directory never held a gateway's state.
    fresh: bool,
    /// Limits from the previous run, by key fingerprint.
    previous: BTreeMap<u128, u64>,
    /// Limits of a version-1 file (`<gateway>.seq`, by SPI), as floors.
    legacy: BTreeMap<u32, u64>,
    guards: BTreeMap<u128, Reservation>,
    /// Limits as last written, by key fingerprint (with the SPI, for people).
    written: BTreeMap<u128, (u64, u32)>,
    /// Keys no SA uses any more, oldest first (bounded by [`RETIRED_KEPT`]).
    retired: VecDeque<u128>,
    write_errors: u64,
    /// The state file open for appending, after a whole write (none: the next write compacts).
    log: Option<File>,
    /// Lines appended since the last whole write.
    appended: usize,
    /// Whole writes and appends so far (reports, tests).
    writes: (u64, u64),
}

impl std::fmt::Debug for SeqStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeqStore")
            .field("file", &self.file)
            .field("keys", &self.guards.len())
            .finish()
    }
}

fn damaged(file: &Path, line: usize, what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "{}:{line}: {what}; the file cannot be trusted to bound the sequence numbers already sent (remove it only if every outbound key has changed since, then start with --new-keys)",
            file.display()
        ),
    )
}

fn read_nofollow(path: &Path) -> io::Result<Option<String>> {
    match open_nofollow(OpenOptions::new().read(true), path) {
        Ok(mut f) => {
            let mut s = String::new();
            f.read_to_string(&mut s).map_err(ctx(path))?;
            Ok(Some(s))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// What a state file holds: limits by key fingerprint (version 2) or by SPI (version 1).
enum Parsed {
    V2(BTreeMap<u128, (u64, u32)>),
    V1(BTreeMap<u32, u64>),
}

fn parse(file: &Path, text: &str) -> io::Result<Parsed> {
    if text.lines().next().is_some_and(|l| l.trim() == HEADER_V1) {
        return parse_v1(file, text).map(Parsed::V1);
    }
    parse_v2(file, text).map(Parsed::V2)
}

fn parse_v2(file: &Path, text: &str) -> io::Result<BTreeMap<u128, (u64, u32)>> {
    let mut lines = text.lines().enumerate();
    match lines.next() {
        Some((_, l)) if l.trim() == HEADER => {}
        Some((_, l)) => {
            return Err(damaged(
                file,
                1,
                &format!("expected the header `{HEADER}`, got {:?}", l.trim()),
            ))
        }
        None => {
            return Err(damaged(
                file,
                1,
                "empty (the writer always writes a header)",
            ))
        }
    }
    let mut out: BTreeMap<u128, (u64, u32)> = BTreeMap::new();
    // A last line without its newline is an append a crash cut short: never granted.
    let complete = text.rfind('\n').map_or(0, |i| i + 1);
    let torn = !text[complete..].is_empty();
    let n = text[..complete].lines().count();
    for (i, line) in lines {
        if torn && i == n {
            break;
        }
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut it = line.split_whitespace();
        let parsed = (|| {
            let fp = it.next().filter(|f| f.len() == 32)?;
            let fp = u128::from_str_radix(fp, 16).ok()?;
            let lim = it.next()?.parse::<u64>().ok()?;
            let spi = u32::from_str_radix(it.next()?.trim_start_matches("0x"), 16).ok()?;
            it.next().is_none().then_some((fp, lim, spi))
        })();
        match parsed {
            Some((fp, lim, spi)) => {
                // An appended line supersedes an earlier one; limits only grow.
                let e = out.entry(fp).or_insert((lim, spi));
                *e = (e.0.max(lim), spi);
            }
            None => {
                return Err(damaged(
                    file,
                    i + 1,
                    &format!("expected `<key fingerprint: 32 hex digits> <sequence number> <spi hex>`, got {line:?}"),
                ))
            }
        }
    }
    Ok(out)
}

/// A version-1 file (`<spi hex> <limit>` lines after [`HEADER_V1`]): per-SPI floors.
fn parse_v1(file: &Path, text: &str) -> io::Result<BTreeMap<u32, u64>> {
    let mut out = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut it = line.split_whitespace();
        let parsed = (|| {
            let spi = u32::from_str_radix(it.next()?.trim_start_matches("0x"), 16).ok()?;
            let lim = it.next()?.parse::<u64>().ok()?;
            Some((spi, lim))
        })();
        match parsed {
            Some((spi, lim)) => {
                out.insert(spi, lim);
            }
            None => {
                return Err(damaged(
                    file,
                    i + 1,
                    &format!("expected `<spi hex> <sequence number>`, got {line:?}"),
                ))
            }
        }
    }
    Ok(out)
}

/// The largest sequence number of an SA.
pub fn seq_space(s: &SaSpec) -> u64 {
    if s.esn {
        u64::MAX
    } else {
        u32::MAX as u64
    }
}

impl SeqStore {
    /// Opens (creating) the state of gateway `gateway` in `dir`, locked against a second
    /// gateway of that name. Every other gateway's state file in `dir` is read as well: the
    /// limits it holds for a key are floors for this gateway too (a renamed gateway).
    pub fn open(dir: &Path, gateway: &str, block: u64) -> io::Result<SeqStore> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| {
                io::Error::new(e.kind(), format!("state directory {}: {e}", dir.display()))
            })?;
        let lock = LockFile::take(
            &dir.join(format!("{gateway}.lock")),
            &format!("the state of gateway {gateway:?} in {}", dir.display()),
        )?;
        let file = dir.join(format!("{gateway}.seq"));
        let (fresh, written, legacy) = match read_nofollow(&file)? {
            None => (true, BTreeMap::new(), BTreeMap::new()),
            Some(text) => match parse(&file, &text)? {
                Parsed::V2(w) => (false, w, BTreeMap::new()),
                Parsed::V1(l) => (false, BTreeMap::new(), l),
            },
        };
        let mut previous: BTreeMap<u128, u64> =
            written.iter().map(|(k, (l, _))| (*k, *l)).collect();
        for other in std::fs::read_dir(dir).map_err(ctx(dir))?.flatten() {
            let path = other.path();
            if path == file || path.extension().is_none_or(|e| e != "seq") {
                continue;
            }
            // Another gateway's keys; a damaged or version-1 file of another gateway is that
            // gateway's to refuse.
            if let Ok(Some(text)) = read_nofollow(&path) {
                if let Ok(Parsed::V2(w)) = parse(&path, &text) {
                    for (k, (l, _)) in w {
                        let e = previous.entry(k).or_insert(0);
                        *e = (*e).max(l);
                    }
                }
            }
        }
        // Every key of the previous run counts as retired until an SA claims it again.
        let retired = written.keys().copied().collect();
        Ok(SeqStore {
            file,
            _lock: lock,
            block: block.max(64),
            fresh,
            previous,
            legacy,
            guards: BTreeMap::new(),
            written,
            retired,
            write_errors: 0,
            log: None,
            appended: 0,
            writes: (0, 0),
        })
    }

    /// Whether this gateway had no state file in the directory before this run.
    pub fn is_fresh(&self) -> bool {
        self.fresh
    }

    /// The guard of outbound SA `s` (one per key: SAs sharing a key share it). It resumes
    /// after the previous run's limit for that key.
    pub fn guard(&mut self, s: &SaSpec) -> Arc<SeqGuard> {
        let fp = s.key_fingerprint();
        let prev = self
            .previous
            .get(&fp)
            .copied()
            .unwrap_or(0)
            .max(self.legacy.get(&s.spi).copied().unwrap_or(0));
        let max = seq_space(s);
        self.guards
            .entry(fp)
            .or_insert_with(|| Reservation {
                guard: Arc::new(SeqGuard::new(s.spi, prev)),
                max,
                spi: s.spi,
            })
            .guard
            .clone()
    }

    /// Binds every outbound SA of `db` to its key's guard.
    pub fn attach(&mut self, db: &mut SaDb) {
        db.attach_seq_guards(|s| self.guard(s));
    }

    /// Binds every outbound SA of one tunnel to its key's guard.
    pub fn attach_tunnel(&mut self, t: &mut TunnelSas) {
        for s in t.outbound.all_mut() {
            s.seq_guard = Some(self.guard(s));
        }
    }

    /// Where the key of `s` resumes (the previous run's limit), for reports.
    pub fn resumes_after(&self, s: &SaSpec) -> u64 {
        self.previous
            .get(&s.key_fingerprint())
            .copied()
            .unwrap_or(0)
            .max(self.legacy.get(&s.spi).copied().unwrap_or(0))
    }

    /// Keys the state file holds.
    pub fn keys(&self) -> usize {
        self.written.len()
    }

    /// Extends every reservation that is within half a block of its end: writes the new limits
    /// durably, then grants them. Returns how many SAs were extended. On a write error nothing
    /// is granted (the workers stop at the old limits) and the error is returned.
    ///
    /// Keys no SA holds any more leave the set of reservations; the file keeps the newest
    /// [`RETIRED_KEPT`] of them.
    pub fn advance(&mut self) -> io::Result<usize> {
        // Guards only this store holds belong to keys no SA uses now.
        let gone: Vec<u128> = self
            .guards
            .iter()
            .filter(|(_, r)| Arc::strong_count(&r.guard) == 1)
            .map(|(k, _)| *k)
            .collect();
        let mut prune = !gone.is_empty();
        for k in gone {
            if let Some(r) = self.guards.remove(&k) {
                self.previous.insert(k, r.guard.limit());
                self.retired.push_back(k);
            }
        }
        self.retired.retain(|k| !self.guards.contains_key(k));
        while self.retired.len() > RETIRED_KEPT {
            if let Some(k) = self.retired.pop_front() {
                self.written.remove(&k);
                prune = true;
            }
        }
        let mut want = Vec::new();
        for (fp, r) in &self.guards {
            if let Some(l) = r.guard.wants(self.block, r.max) {
                want.push((*fp, l, r.spi));
            }
        }
        if want.is_empty() && !prune {
            return Ok(0);
        }
        // Append what changed, unless the file is due for a whole write: keys pruned, no log
        // open yet (the first write of a run compacts whatever the last run left), or more
        // appended lines than keys.
        let compact =
            prune || self.log.is_none() || self.appended + want.len() > self.written.len().max(256);
        let r = if compact {
            let mut next = self.written.clone();
            for (fp, l, spi) in &want {
                let e = next.entry(*fp).or_insert((0, *spi));
                *e = (e.0.max(*l), *spi);
            }
            self.write(&next).map(|log| {
                self.written = next;
                self.log = Some(log);
                self.appended = 0;
                self.writes.0 += 1;
            })
        } else {
            self.append(&want).map(|()| {
                for (fp, l, spi) in &want {
                    let e = self.written.entry(*fp).or_insert((0, *spi));
                    *e = (e.0.max(*l), *spi);
                }
                self.appended += want.len();
                self.writes.1 += 1;
            })
        };
        if let Err(e) = r {
            self.write_errors += 1;
            // What a failed append left is not trusted: the next write is a whole one.
            self.log = None;
            return Err(e);
        }
        for (fp, l, _) in &want {
            self.guards[fp].guard.grant(*l);
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

    /// Whole writes (compactions) and appends so far.
    pub fn writes(&self) -> (u64, u64) {
        self.writes
    }

    /// Appends the new limits `want` to the state file and makes them durable.
    fn append(&mut self, want: &[(u128, u64, u32)]) -> io::Result<()> {
        let mut text = String::with_capacity(want.len() * 56);
        for (fp, l, spi) in want {
            text.push_str(&format!("{fp:032x} {l} {spi:#010x}\n"));
        }
        let c = ctx(&self.file);
        let f = self.log.as_mut().expect("append only after a whole write");
        // One write(2) of whole lines; then the data (the size included) is durable.
        f.write_all(text.as_bytes()).map_err(&c)?;
        f.sync_data().map_err(&c)
    }

    /// Writes `limits` whole (temporary file, rename) and returns the file open for appending.
    fn write(&self, limits: &BTreeMap<u128, (u64, u32)>) -> io::Result<File> {
        let dir = self.file.parent().unwrap_or(Path::new("."));
        let tmp = self.file.with_extension("seq.tmp");
        let mut text = format!(
            "{HEADER}\n# espada: highest sequence number reserved per outbound key (HMAC fingerprint), never edit down\n"
        );
        for (fp, (l, spi)) in limits {
            text.push_str(&format!("{fp:032x} {l} {spi:#010x}\n"));
        }
        let c = ctx(&tmp);
        // A leftover (or planted) temporary file or link goes first; the new one is created
        // afresh, never through a link.
        match std::fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(c(e)),
        }
        {
            let mut f = open_nofollow(
                OpenOptions::new().create_new(true).write(true).mode(0o600),
                &tmp,
            )?;
            f.write_all(text.as_bytes()).map_err(&c)?;
            f.sync_all().map_err(&c)?;
        }
        std::fs::rename(&tmp, &self.file).map_err(ctx(&self.file))?;
        File::open(dir).and_then(|d| d.sync_all())?;
        open_nofollow(OpenOptions::new().append(true), &self.file)
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use espada_crypto::{Algorithm, KeyMaterial};
    use espada_sadb::lifetime::Lifetimes;
    use espada_sadb::sa::TunnelEndpoints;

    fn sa(spi: u32, key: u8) -> SaSpec {
        SaSpec::new(
            spi,
            KeyMaterial::new(Algorithm::AesGcm128, &[key; 20]).unwrap(),
            false,
            64,
            Lifetimes::default(),
            TunnelEndpoints::new("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap()),
            None,
        )
    }

    #[test]
    fn reservations_survive_a_restart_and_only_grow() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SeqStore::open(dir.path(), "west", 1000).unwrap();
        assert!(s.is_fresh());
        let spec = sa(0x1001, 1);
        let g = s.guard(&spec);
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
        assert!(!s.is_fresh());
        assert_eq!(s.resumes_after(&spec), 1700);
        let g = s.guard(&spec);
        assert_eq!((g.used(), g.limit()), (1700, 1700));
        s.advance().unwrap();
        assert_eq!(g.limit(), 2700);
    }

    #[test]
    fn reservations_follow_the_key_not_the_gateway_name_or_spi() {
        // Issue 24 item 4: a renamed gateway, or the same key under another SPI, resumes above
        // what the key already sent.
        let dir = tempfile::tempdir().unwrap();
        let mut s = SeqStore::open(dir.path(), "west", 1000).unwrap();
        let g = s.guard(&sa(0x1001, 7));
        s.advance().unwrap();
        g.note_used(900);
        s.advance().unwrap();
        drop((g, s));
        let s = SeqStore::open(dir.path(), "renamed", 1000).unwrap();
        assert!(s.is_fresh(), "its own file is new");
        assert_eq!(
            s.resumes_after(&sa(0x2002, 7)),
            1900,
            "the key's floor from west.seq"
        );
        assert_eq!(
            s.resumes_after(&sa(0x1001, 8)),
            0,
            "another key is another counter"
        );
        let text = std::fs::read_to_string(dir.path().join("west.seq")).unwrap();
        assert!(text.starts_with("espada-seq 2\n"), "{text}");
        // Two gateways share a directory (each its own file and lock).
        let _east = SeqStore::open(dir.path(), "east", 1000).unwrap();
        assert!(
            !text.contains(&hex(&[7; 16])),
            "no key bytes in the file: {text}"
        );
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn a_version_1_file_is_carried_over_by_spi() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("west.seq"),
            format!("{HEADER_V1}\n0x00001001 5000\n"),
        )
        .unwrap();
        let mut s = SeqStore::open(dir.path(), "west", 1000).unwrap();
        assert!(!s.is_fresh());
        let spec = sa(0x1001, 3);
        assert_eq!(s.resumes_after(&spec), 5000);
        assert_eq!(s.guard(&spec).used(), 5000);
    }

    #[test]
    fn a_damaged_state_file_is_refused_with_its_line() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("west.seq"),
            format!("{HEADER}\n{:032x} 5 0x1001\nnonsense\n", 1u128),
        )
        .unwrap();
        let e = SeqStore::open(dir.path(), "west", 1000).unwrap_err();
        assert!(e.to_string().contains("west.seq:3:"), "{e}");
    }

    #[test]
    fn an_empty_or_headless_state_file_is_damage_not_a_first_run() {
        // Issue 24 item 4: a 0-byte file can only be damage (the writer always writes the
        // header); it used to resume every SPI at 0.
        for text in ["", "0x00001001 5\n", "\n\n"] {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("west.seq"), text).unwrap();
            let e = SeqStore::open(dir.path(), "west", 1000).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{text:?}");
            assert!(e.to_string().contains("west.seq:1:"), "{e}");
        }
        // Another gateway's state in the same directory is no excuse either.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("east.seq"), format!("{HEADER}\n")).unwrap();
        std::fs::write(dir.path().join("west.seq"), "").unwrap();
        assert!(SeqStore::open(dir.path(), "west", 1000).is_err());
    }

    #[test]
    fn state_files_and_locks_are_never_opened_through_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, "precious\n").unwrap();
        std::os::unix::fs::symlink(&target, dir.path().join("west.seq")).unwrap();
        let e = SeqStore::open(dir.path(), "west", 1000).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        std::fs::remove_file(dir.path().join("west.seq")).unwrap();
        assert!(
            !dir.path().join("west.lock").exists(),
            "the lock went with the failed open"
        );
        std::os::unix::fs::symlink(&target, dir.path().join("west.lock")).unwrap();
        let e = SeqStore::open(dir.path(), "west", 1000).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        std::fs::remove_file(dir.path().join("west.lock")).unwrap();
        // A planted temporary file link is replaced, not written through.
        std::os::unix::fs::symlink(&target, dir.path().join("west.seq.tmp")).unwrap();
        let mut s = SeqStore::open(dir.path(), "west", 1000).unwrap();
        let _g = s.guard(&sa(1, 1));
        s.advance().unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious\n");
    }

    #[test]
    fn keys_no_longer_used_leave_the_file_beyond_a_bound() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SeqStore::open(dir.path(), "west", 1000).unwrap();
        for i in 0..(RETIRED_KEPT + 50) {
            let g = s.guard(&key(i as u64));
            s.advance().unwrap();
            drop(g); // the SA goes (a rekey, `sa del`)
        }
        let keep = sa(0x9999, 0x99);
        let _g = s.guard(&keep);
        s.advance().unwrap();
        assert!(s.keys() <= RETIRED_KEPT + 1, "{}", s.keys());
        assert!(s.keys() >= RETIRED_KEPT, "{}", s.keys());
    }

    fn key(i: u64) -> SaSpec {
        let mut k = [0u8; 20];
        k[..8].copy_from_slice(&i.to_le_bytes());
        SaSpec::new(
            0x1000 + i as u32,
            KeyMaterial::new(Algorithm::AesGcm128, &k).unwrap(),
            false,
            64,
            Lifetimes::default(),
            TunnelEndpoints::new("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap()),
            None,
        )
    }

    #[test]
    fn an_extension_appends_its_lines_and_the_file_is_compacted_when_they_outnumber_the_keys() {
        // Issue 26: one SA's extension used to rewrite the whole file (10 000 lines with
        // 10 000 tunnels). Now it appends one line; a restart reads the newest limit of each key.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("west.seq");
        let mut s = SeqStore::open(dir.path(), "west", 1000).unwrap();
        let guards: Vec<_> = (0..300).map(|i| s.guard(&key(i))).collect();
        s.advance().unwrap();
        assert_eq!(s.writes(), (1, 0), "the first write of a run is whole");
        let lines = |p: &Path| std::fs::read_to_string(p).unwrap().lines().count();
        let whole = lines(&path);
        assert_eq!(whole, 2 + 300);
        let mut used = 0;
        for round in 1..=3u64 {
            used = round * 700;
            guards[7].note_used(used);
            assert_eq!(s.advance().unwrap(), 1);
            assert_eq!(s.writes(), (1, round), "an append, not a rewrite");
            assert_eq!(lines(&path), whole + round as usize);
        }
        drop((guards, s));
        let mut s = SeqStore::open(dir.path(), "west", 1000).unwrap();
        assert_eq!(
            s.resumes_after(&key(7)),
            used + 1000,
            "the newest line wins"
        );
        assert_eq!(s.resumes_after(&key(8)), 1000);
        // Appends beyond the number of keys compact the file back to one line per key.
        let guards: Vec<_> = (0..300).map(|i| s.guard(&key(i))).collect();
        s.advance().unwrap();
        let mut n = 0u64;
        while s.writes().0 < 2 {
            n += 1;
            guards[1].note_used(s.resumes_after(&key(1)) + n * 1000);
            s.advance().unwrap();
            assert!(lines(&path) <= 2 + 300 + 300, "{}", lines(&path));
        }
        assert_eq!(lines(&path), 2 + 300, "compacted");
        drop((guards, s));
        let s = SeqStore::open(dir.path(), "west", 1000).unwrap();
        assert!(s.resumes_after(&key(1)) >= n * 1000);
    }

    #[test]
    fn an_append_cut_short_by_a_crash_is_ignored_and_a_complete_one_counts() {
        let dir = tempfile::tempdir().unwrap();
        let fp = key(1).key_fingerprint();
        let text = format!("{HEADER}\n{fp:032x} 5000 0x1001\n{fp:032x} 9000 0x1001\n{fp:032x} 99");
        std::fs::write(dir.path().join("west.seq"), &text).unwrap();
        let s = SeqStore::open(dir.path(), "west", 1000).unwrap();
        assert_eq!(s.resumes_after(&key(1)), 9000);
        drop(s);
        // A complete line that does not parse is still damage.
        std::fs::write(dir.path().join("west.seq"), format!("{text}\n")).unwrap();
        let e = SeqStore::open(dir.path(), "west", 1000).unwrap_err();
        assert!(e.to_string().contains("west.seq:4:"), "{e}");
        std::fs::write(
            dir.path().join("west.seq"),
            format!("{HEADER}\n{fp:032x} 5000\n{fp:032x} 9000 0x1001\n"),
        )
        .unwrap();
        let e = SeqStore::open(dir.path(), "west", 1000).unwrap_err();
        assert!(e.to_string().contains("west.seq:2:"), "{e}");
    }

    #[test]
    fn the_lock_file_goes_when_the_lock_is_let_go() {
        // Issue 27 paper cut: lock files stayed behind after every run.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("west.lock");
        let a = LockFile::take(&p, "west").unwrap();
        assert!(std::fs::read_to_string(&p).unwrap().starts_with("pid "));
        assert_eq!(
            LockFile::take(&p, "west").unwrap_err().kind(),
            io::ErrorKind::AddrInUse
        );
        drop(a);
        assert!(!p.exists(), "removed when let go");
        let b = LockFile::take(&p, "west").unwrap();
        assert!(p.exists());
        drop(b);
        // Many takers racing the removal: one holder at a time, never two.
        let held = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (p, held) = (p.clone(), held.clone());
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        if let Ok(l) = LockFile::take(&p, "west") {
                            assert_eq!(held.fetch_add(1, std::sync::atomic::Ordering::SeqCst), 0);
                            held.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                            drop(l);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn an_unwritable_state_is_an_error_not_a_grant() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SeqStore::open(dir.path(), "west", 1000).unwrap();
        let g = s.guard(&sa(7, 7));
        // A directory where the file must go makes the rename fail.
        std::fs::create_dir(dir.path().join("west.seq")).unwrap();
        std::fs::write(dir.path().join("west.seq").join("x"), "").unwrap();
        assert!(s.advance().is_err());
        assert_eq!(g.limit(), 0, "nothing granted that is not written");
        assert_eq!(s.write_errors(), 1);
    }

    #[test]
    fn interfaces_are_locked_per_namespace_whatever_the_directories() {
        // Issue 24 item 3: the lock is an abstract socket of the network namespace; no
        // directory decides it.
        let name = format!("black-test-{}", std::process::id());
        let a = lock_interface(&name).unwrap();
        let e = lock_interface(&name).unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("interface {name} is held by another espada")),
            "{e}"
        );
        assert!(lock_interface(&format!("red-test-{}", std::process::id())).is_ok());
        drop(a);
        assert!(lock_interface(&name).is_ok());
    }
}
