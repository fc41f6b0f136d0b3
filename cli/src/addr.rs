//! Addresses as people type them on the command line: `HOST:PORT` with an IP literal or a host
//! name, checked (and a name resolved) while the flags are parsed, before any node starts.

use std::net::{SocketAddr, ToSocketAddrs};

/// A clap value parser for `127.0.0.1:8000`, `[::1]:8000`, `localhost:8000` or `0.0.0.0:0`. A
/// host name resolves once, here, to its first IPv4 address (else its first), so a typo fails
/// naming the flag the user typed, not inside a child process.
pub fn socket_addr(value: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = value.parse() {
        return Ok(addr);
    }
    if value.parse::<u16>().is_ok() {
        return Err(format!(
            "expected HOST:PORT, got a bare port {value} (try 127.0.0.1:{value})"
        ));
    }
    // Only a well-formed name goes to the resolver; anything else is refused here.
    let host = value.rsplit_once(':').map_or(value, |(h, _)| h);
    let name_like = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    if !name_like {
        return Err(format!(
            "expected HOST:PORT with a host name (letters, digits, '-', '.') or an IP, got {value:?}"
        ));
    }
    let addrs: Vec<SocketAddr> = value
        .to_socket_addrs()
        .map_err(|e| {
            format!(
                "expected HOST:PORT (e.g. 127.0.0.1:8000 or localhost:8000), got {value:?}: {e}"
            )
        })?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("{value:?} resolves to no address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_and_localhost_parse_and_bare_ports_are_refused_by_example() {
        assert_eq!(
            socket_addr("127.0.0.1:8000").unwrap(),
            "127.0.0.1:8000".parse().unwrap()
        );
        assert_eq!(socket_addr("[::1]:9").unwrap(), "[::1]:9".parse().unwrap());
        let local = socket_addr("localhost:8000").unwrap();
        assert!(local.ip().is_loopback() && local.port() == 8000, "{local}");
        let err = socket_addr("8000").unwrap_err();
        assert!(
            err.contains("bare port 8000") && err.contains("127.0.0.1:8000"),
            "{err}"
        );
        let err = socket_addr("localhost").unwrap_err();
        assert!(
            err.contains("HOST:PORT") && err.contains("\"localhost\""),
            "{err}"
        );
        assert!(socket_addr("localhost:99999").is_err());
        let err = socket_addr("no such host!:80").unwrap_err();
        assert!(err.contains("host name"), "{err}");
    }
}
