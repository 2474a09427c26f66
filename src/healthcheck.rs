//! `iotagent-mqtt healthcheck`: asks the running service whether it is ready, for container health checks (the
//! runtime image has no curl). Plain blocking std I/O: no runtime, no HTTP client, bounded by a timeout.

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// The first argument that selects this mode instead of the service.
pub const COMMAND: &str = "healthcheck";

/// The service's default `IOTAGENT_LISTEN`.
const DEFAULT_LISTEN: &str = "0.0.0.0:8080";
const PATH: &str = "/health/ready";
const TIMEOUT: Duration = Duration::from_secs(3);
/// The readiness report is a few hundred bytes; anything far larger is not our service.
const MAX_RESPONSE: usize = 64 * 1024;

/// Where to reach a service listening on `listen` from inside its own container: the loopback address when it
/// listens on every address, else that address.
///
/// # Errors
/// `listen` is not an `ip:port` socket address.
pub fn probe_address(listen: &str) -> Result<SocketAddr, String> {
    let listen: SocketAddr =
        listen.trim().parse().map_err(|e| format!("IOTAGENT_LISTEN {listen:?} is not an ip:port address: {e}"))?;
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    Ok(SocketAddr::new(ip, listen.port()))
}

/// The status code and body of an HTTP/1.x response read whole.
///
/// # Errors
/// Not an HTTP/1.x response.
pub fn parse_response(response: &[u8]) -> Result<(u16, &[u8]), String> {
    let head_end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("incomplete HTTP response ({} bytes)", response.len()))?;
    let status_line = response[..head_end].split(|&b| b == b'\n').next().unwrap_or_default();
    let status_line = String::from_utf8_lossy(status_line);
    let mut parts = status_line.split_whitespace();
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return Err(format!("bad status line {:?}", status_line.trim_end()));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(format!("not an HTTP/1.x response: {:?}", status_line.trim_end()));
    }
    let code = code
        .parse::<u16>()
        .ok()
        .filter(|c| (100..=599).contains(c))
        .ok_or_else(|| format!("bad status code in {:?}", status_line.trim_end()))?;
    Ok((code, &response[head_end + 4..]))
}

/// GETs `/health/ready` at `addr`. `Ok` with the report when the service answers 200.
///
/// # Errors
/// Why the service does not count as ready: unreachable, too slow, or any other status (with its report).
pub fn check(addr: SocketAddr, timeout: Duration) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    let mut stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let remaining = || deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    stream.set_write_timeout(Some(remaining())).map_err(|e| e.to_string())?;
    let request =
        format!("GET {PATH} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).map_err(|e| format!("cannot send the request to {addr}: {e}"))?;
    let mut response = Vec::new();
    let mut buffer = [0; 4096];
    loop {
        if Instant::now() >= deadline {
            return Err(format!("no complete answer from {addr} within {timeout:?}"));
        }
        stream.set_read_timeout(Some(remaining())).map_err(|e| e.to_string())?;
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) if response.len() + n > MAX_RESPONSE => {
                return Err(format!("answer from {addr} larger than {MAX_RESPONSE} bytes"));
            }
            Ok(n) => response.extend_from_slice(&buffer[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("no complete answer from {addr}: {e}")),
        }
    }
    let (status, body) = parse_response(&response)?;
    let body = String::from_utf8_lossy(body).trim().to_string();
    if status == 200 { Ok(body) } else { Err(format!("GET {PATH} answered {status}: {body}")) }
}

/// The `healthcheck` command: exit 0 when ready, 1 otherwise, saying why on stdout (what `docker inspect` shows).
pub fn run() -> ExitCode {
    let listen = std::env::var("IOTAGENT_LISTEN").unwrap_or_else(|_| DEFAULT_LISTEN.into());
    let result = probe_address(&listen).and_then(|addr| check(addr, TIMEOUT));
    match result {
        Ok(report) => {
            println!("ready: {report}");
            ExitCode::SUCCESS
        }
        Err(why) => {
            println!("not ready: {why}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_address_uses_loopback_for_wildcards() {
        assert_eq!(probe_address("0.0.0.0:8080").unwrap(), "127.0.0.1:8080".parse().unwrap());
        assert_eq!(probe_address("[::]:9000").unwrap(), "[::1]:9000".parse().unwrap());
        assert_eq!(probe_address(" 10.1.2.3:81 ").unwrap(), "10.1.2.3:81".parse().unwrap());
        assert_eq!(probe_address("127.0.0.1:0").unwrap().port(), 0);
        for bad in ["8080", "localhost:8080", "0.0.0.0", "0.0.0.0:99999", ""] {
            let err = probe_address(bad).unwrap_err();
            assert!(err.contains("IOTAGENT_LISTEN"), "{bad}: {err}");
        }
    }

    #[test]
    fn parse_response_reads_status_and_body() {
        let ok = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{\"a\":true}\n";
        assert_eq!(parse_response(ok).unwrap(), (200, &b"{\"a\":true}\n"[..]));
        let down = b"HTTP/1.1 503 Service Unavailable\r\n\r\n{\"ready\":false}";
        assert_eq!(parse_response(down).unwrap().0, 503);
        assert_eq!(parse_response(b"HTTP/1.0 204 No Content\r\n\r\n").unwrap(), (204, &b""[..]));
        for bad in [
            &b""[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n",
            b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
            b"HTTP/1.1 abc\r\n\r\n",
            b"HTTP/1.1 2000 Huge\r\n\r\n",
            b"HTTP/1.1\r\n\r\n",
        ] {
            assert!(parse_response(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn check_reports_a_closed_port() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let err = check(SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_secs(1)).unwrap_err();
        assert!(err.contains("cannot connect"), "{err}");
    }

    #[test]
    fn check_times_out_on_a_silent_server() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let started = Instant::now();
        let err = check(addr, Duration::from_millis(300)).unwrap_err();
        assert!(err.contains("no complete answer"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2));
        drop(listener);
    }
}
