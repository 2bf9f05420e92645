//! What the control socket and the metrics listener share: bounded requests, one deadline per
//! connection, write timeouts, and several clients at once (bounded). One slow or hostile
//! client can neither block the others nor grow the gateway's heap.

use std::io::{self, BufRead};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Limits of one listener.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Connections served at once; more are closed at once (and counted).
    pub max_clients: usize,
    /// A connection's whole life: reading its requests and writing its answers.
    pub deadline: Duration,
    /// Bytes in one request line (the control socket) or in the request head (HTTP).
    pub max_request: usize,
}

impl ConnLimits {
    /// The control socket's: 16 clients, 10 s, 4 MiB a request (an `sa batch` of a few
    /// thousand SAs with their keys).
    pub const CONTROL: ConnLimits = ConnLimits {
        max_clients: 16,
        deadline: Duration::from_secs(10),
        max_request: 4 << 20,
    };
    /// The metrics listener's: 8 clients, 5 s, 8 KiB of request head.
    pub const METRICS: ConnLimits = ConnLimits {
        max_clients: 8,
        deadline: Duration::from_secs(5),
        max_request: 8 * 1024,
    };
}

/// Counts the connections being served and those refused.
#[derive(Debug, Default)]
pub struct Slots {
    busy: AtomicUsize,
    refused: AtomicUsize,
}

/// One connection's place; freed when dropped.
pub struct Slot(Arc<Slots>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Slots {
    /// A place for one more connection, or `None` (counted) when `max` are being served.
    pub fn take(self: &Arc<Self>, max: usize) -> Option<Slot> {
        let mut cur = self.busy.load(Ordering::Acquire);
        loop {
            if cur >= max {
                self.refused.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            match self
                .busy
                .compare_exchange(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Some(Slot(self.clone())),
                Err(now) => cur = now,
            }
        }
    }

    /// Connections refused because too many were being served.
    pub fn refused(&self) -> usize {
        self.refused.load(Ordering::Relaxed)
    }

    /// Connections being served now.
    pub fn busy(&self) -> usize {
        self.busy.load(Ordering::Relaxed)
    }
}

/// A socket whose read and write timeouts can be set.
pub trait Timeouts {
    /// Sets both timeouts.
    fn set_timeouts(&self, t: Duration) -> io::Result<()>;
}

impl Timeouts for std::os::unix::net::UnixStream {
    fn set_timeouts(&self, t: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(t))?;
        self.set_write_timeout(Some(t))
    }
}

impl Timeouts for std::net::TcpStream {
    fn set_timeouts(&self, t: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(t))?;
        self.set_write_timeout(Some(t))
    }
}

/// The accepting thread of a listener (the control socket's, the metrics'): accepts blocking
/// (no polling: the owner wakes it with a connection of its own after setting `stop`), serves
/// each client on a thread of its own (`name`), at most `lim.max_clients` at once; a client
/// beyond that gets `busy` and is closed (counted in `slots`).
pub fn accept_loop<S, I, F>(
    name: &str,
    incoming: I,
    stop: Arc<std::sync::atomic::AtomicBool>,
    slots: Arc<Slots>,
    lim: ConnLimits,
    busy: &'static [u8],
    serve: F,
) -> io::Result<std::thread::JoinHandle<()>>
where
    S: io::Write + Timeouts + Send + 'static,
    I: Iterator<Item = io::Result<S>> + Send + 'static,
    F: Fn(S, ConnLimits) + Send + Sync + 'static,
{
    let serve = Arc::new(serve);
    let conn_name = format!("{name}-conn");
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            for s in incoming {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(mut s) = s else {
                    continue;
                };
                let Some(slot) = slots.take(lim.max_clients) else {
                    let _ = s.set_timeouts(Duration::from_millis(100));
                    let _ = s.write_all(busy);
                    continue;
                };
                let serve = serve.clone();
                let _ = std::thread::Builder::new()
                    .name(conn_name.clone())
                    .spawn(move || {
                        let _slot = slot;
                        serve(s, lim);
                    });
            }
        })
}

/// Sets `s`'s timeouts to what is left of `deadline`; an error once it has passed.
pub fn arm(s: &impl Timeouts, deadline: Instant) -> io::Result<()> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the connection's deadline passed",
        ));
    }
    s.set_timeouts(left)
}

/// Reads one line (up to and including `\n`) into `buf`, at most `max` bytes, before
/// `deadline` (re-armed on `s` before every read: the deadline is the connection's, not each
/// read's). Returns 0 at the end of the stream.
pub fn read_line<R: BufRead>(
    r: &mut R,
    s: &impl Timeouts,
    buf: &mut Vec<u8>,
    max: usize,
    deadline: Instant,
) -> io::Result<usize> {
    buf.clear();
    loop {
        arm(s, deadline)?;
        let (done, used) = {
            let avail = r.fill_buf()?;
            if avail.is_empty() {
                return Ok(buf.len());
            }
            match avail.iter().position(|&b| b == b'\n') {
                Some(i) => (true, i + 1),
                None => (false, avail.len()),
            }
        };
        if buf.len() + used > max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("request longer than {max} bytes"),
            ));
        }
        buf.extend_from_slice(&r.fill_buf()?[..used]);
        r.consume(used);
        if done {
            return Ok(buf.len());
        }
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_line_without_end_stops_at_the_bound() {
        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(&[b'x'; 5000]).unwrap();
        let mut r = io::BufReader::new(a.try_clone().unwrap());
        let mut buf = Vec::new();
        let e = read_line(
            &mut r,
            &a,
            &mut buf,
            1024,
            Instant::now() + Duration::from_secs(2),
        )
        .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(buf.len() <= 1024);
    }

    #[test]
    fn the_deadline_is_the_connection_s_not_each_read_s() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            // A byte every 100 ms, never a newline: each read is quick, the whole is not.
            for _ in 0..30 {
                if b.write_all(b"x").is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let mut r = io::BufReader::new(a.try_clone().unwrap());
        let mut buf = Vec::new();
        let t0 = Instant::now();
        let e = read_line(
            &mut r,
            &a,
            &mut buf,
            1 << 20,
            t0 + Duration::from_millis(500),
        )
        .unwrap_err();
        assert!(
            matches!(
                e.kind(),
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
            ),
            "{e:?}"
        );
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        drop((r, a));
        t.join().unwrap();
    }

    #[test]
    fn slots_are_bounded_and_freed() {
        let s = Arc::new(Slots::default());
        let a = s.take(2).unwrap();
        let _b = s.take(2).unwrap();
        assert!(s.take(2).is_none());
        assert_eq!(s.refused(), 1);
        drop(a);
        assert!(s.take(2).is_some());
    }
}
