//! The metrics endpoint's HTTP server: one thread, non-blocking sockets and poll(2), so several
//! scrapers are served at once and no client can starve another. Bounded everywhere: at most
//! `MAX_CONNS` connections (the oldest is dropped for a new one), a request must arrive whole
//! within `REQUEST_DEADLINE` and fit in `MAX_REQUEST` bytes, a response is written within
//! `WRITE_TIMEOUT`, and a failing accept() backs off instead of spinning.
//!
//! Hand-written rather than a crate: it answers one GET path with a body rendered on the spot,
//! and a small poll loop keeps the service at its fixed thread count (an async runtime or a
//! thread-per-connection server would not).

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

pub const MAX_CONNS: usize = 64;
pub const MAX_REQUEST: usize = 4096;
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(2);
const WRITE_TIMEOUT: Duration = Duration::from_secs(1);

struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
    since: Instant,
}

/// What to answer: status line, content type, body.
pub type Answer = (&'static str, &'static str, String);

/// Serves requests on `listener` until the process exits; `answer` gets the request line.
pub fn serve(listener: TcpListener, answer: impl Fn(&str) -> Answer) {
    if listener.set_nonblocking(true).is_err() {
        return;
    }
    let mut conns: Vec<Conn> = Vec::with_capacity(MAX_CONNS);
    let mut fds: Vec<libc::pollfd> = Vec::with_capacity(MAX_CONNS + 1);
    let mut accept_errors = 0u32;
    loop {
        fds.clear();
        fds.push(libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 });
        fds.extend(conns.iter().map(|c| libc::pollfd {
            fd: c.s.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }));
        // Wake for the earliest deadline (or once a second).
        let now = Instant::now();
        let wait = conns
            .iter()
            .map(|c| (c.since + REQUEST_DEADLINE).saturating_duration_since(now))
            .min()
            .unwrap_or(Duration::from_secs(1))
            .min(Duration::from_secs(1));
        // SAFETY: `fds` is a live array of initialised pollfds, its length passed with it.
        let n = unsafe {
            libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait.as_millis() as i32 + 1)
        };
        if n < 0 {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        // Requests first (in reverse, so removing by index keeps the rest in place).
        for i in (0..conns.len()).rev() {
            let ready = fds[i + 1].revents != 0;
            if ready && step(&mut conns[i], &answer) {
                conns.swap_remove(i);
            } else if conns[i].since.elapsed() > REQUEST_DEADLINE {
                // Too slow: answered with nothing.
                conns.swap_remove(i);
            }
        }
        if fds[0].revents != 0 {
            loop {
                match listener.accept() {
                    Ok((s, _)) => {
                        accept_errors = 0;
                        if s.set_nonblocking(true).is_err() {
                            continue;
                        }
                        if conns.len() == MAX_CONNS {
                            // Full: the connection that has waited longest makes room.
                            let oldest = (0..conns.len()).min_by_key(|&i| conns[i].since);
                            if let Some(i) = oldest {
                                conns.swap_remove(i);
                            }
                        }
                        conns.push(Conn { s, buf: Vec::with_capacity(512), since: Instant::now() });
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => {
                        // EMFILE and friends persist: back off (up to 1 s) rather than spin.
                        accept_errors = (accept_errors + 1).min(10);
                        std::thread::sleep(Duration::from_millis(100 * u64::from(accept_errors)));
                        break;
                    }
                }
            }
        }
    }
}

/// Reads what `c` has sent; once the request head is complete (or too long), answers it.
/// True when the connection is done.
fn step(c: &mut Conn, answer: &impl Fn(&str) -> Answer) -> bool {
    let mut chunk = [0u8; 1024];
    loop {
        match c.s.read(&mut chunk) {
            Ok(0) => return true,
            Ok(n) => c.buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false_unless_complete(c, answer),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return true,
        }
        if c.buf.len() > MAX_REQUEST {
            respond(&mut c.s, ("431 Request Header Fields Too Large", "text/plain", String::new()));
            return true;
        }
        if complete(&c.buf) {
            return false_unless_complete(c, answer);
        }
    }
}

fn complete(buf: &[u8]) -> bool {
    buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n")
}

fn false_unless_complete(c: &mut Conn, answer: &impl Fn(&str) -> Answer) -> bool {
    if !complete(&c.buf) {
        return false;
    }
    let head = String::from_utf8_lossy(&c.buf);
    let line = head.lines().next().unwrap_or("");
    respond(&mut c.s, answer(line));
    true
}

fn respond(s: &mut TcpStream, (status, ctype, body): Answer) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_write_timeout(Some(WRITE_TIMEOUT));
    let _ = write!(
        s,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    #[test]
    fn idle_and_trickling_clients_do_not_starve_a_scrape() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            serve(l, |line| {
                if line.starts_with("GET /metrics") {
                    ("200 OK", "text/plain", "up 1\n".into())
                } else {
                    ("404 Not Found", "text/plain", String::new())
                }
            })
        });
        // More idle connections than the server keeps, and one sending a byte at a time.
        let idle: Vec<TcpStream> =
            (0..MAX_CONNS + 10).map(|_| TcpStream::connect(addr).unwrap()).collect();
        let mut slow = TcpStream::connect(addr).unwrap();
        slow.write_all(b"GET /met").unwrap();
        let r = get(addr, "/metrics");
        assert!(r.starts_with("HTTP/1.1 200 OK") && r.ends_with("up 1\n"), "{r}");
        assert!(get(addr, "/other").starts_with("HTTP/1.1 404"));
        // An oversized request head gets 431.
        let mut big = TcpStream::connect(addr).unwrap();
        big.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = big.write_all(&[b'x'; MAX_REQUEST + 100]);
        let mut out = String::new();
        let _ = big.read_to_string(&mut out);
        assert!(out.starts_with("HTTP/1.1 431"), "{out}");
        drop(idle);
    }
}
