//! A process's open files and established TCP connections, read from `/proc`: how the tests
//! and benches see how many connections a process holds to the API server.

use std::collections::HashSet;
use std::fs;

use anyhow::{Context, Result};

/// One established TCP connection of a process, by its ports (the test bed's connections are
/// all on loopback).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpConn {
    /// This end's port.
    pub local_port: u16,
    /// The peer's port.
    pub remote_port: u16,
}

/// How many file descriptors process `pid` holds.
pub fn open_files(pid: u32) -> Result<usize> {
    Ok(fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("reading /proc/{pid}/fd"))?
        .count())
}

/// The established TCP connections (IPv4 and IPv6) whose sockets process `pid` holds open.
pub fn tcp_connections(pid: u32) -> Result<Vec<TcpConn>> {
    let mut inodes = HashSet::new();
    for entry in fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("reading /proc/{pid}/fd"))?
    {
        // A descriptor closed while listing is skipped.
        let Ok(target) = fs::read_link(entry?.path()) else {
            continue;
        };
        if let Some(inode) = socket_inode(&target.to_string_lossy()) {
            inodes.insert(inode);
        }
    }
    let mut out = Vec::new();
    for table in ["tcp", "tcp6"] {
        let path = format!("/proc/{pid}/net/{table}");
        let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        out.extend(
            parse_tcp_table(&text)
                .into_iter()
                .filter(|(_, inode)| inodes.contains(inode))
                .map(|(conn, _)| conn),
        );
    }
    Ok(out)
}

/// Process `pid`'s established connections to port `port` (the peer's).
pub fn connections_to(pid: u32, port: u16) -> Result<Vec<TcpConn>> {
    Ok(tcp_connections(pid)?
        .into_iter()
        .filter(|c| c.remote_port == port)
        .collect())
}

/// The inode of a `/proc/<pid>/fd` link target `socket:[<inode>]`.
fn socket_inode(target: &str) -> Option<u64> {
    target
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// The established connections of a `/proc/net/tcp` or `tcp6` table, with their socket inodes.
fn parse_tcp_table(text: &str) -> Vec<(TcpConn, u64)> {
    const ESTABLISHED: &str = "01";
    let port = |addr: &str| u16::from_str_radix(addr.rsplit_once(':')?.1, 16).ok();
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.get(3) != Some(&ESTABLISHED) {
                return None;
            }
            let conn = TcpConn {
                local_port: port(f.get(1)?)?,
                remote_port: port(f.get(2)?)?,
            };
            Some((conn, f.get(9)?.parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1A0B 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1061 1 0000000000000000 100 0 0 10 0
   1: 0100007F:A1B2 0100007F:1A0B 01 00000000:00000000 02:000A7D0D 00000000     0        0 4242 2 0000000000000000 20 4 30 10 -1
   2: 0100007F:1A0B 0100007F:A1B2 01 00000000:00000000 02:000A7D0D 00000000     0        0 4243 2 0000000000000000 20 4 30 10 -1
   3: 0100007F:C000 0100007F:1A0B 06 00000000:00000000 03:00000000 00000000     0        0 0 3 0000000000000000
";

    #[test]
    fn reads_established_connections_only() {
        assert_eq!(
            parse_tcp_table(TABLE),
            vec![
                (
                    TcpConn {
                        local_port: 0xA1B2,
                        remote_port: 6667
                    },
                    4242
                ),
                (
                    TcpConn {
                        local_port: 6667,
                        remote_port: 0xA1B2
                    },
                    4243
                ),
            ]
        );
    }

    #[test]
    fn reads_socket_links_only() {
        assert_eq!(socket_inode("socket:[4242]"), Some(4242));
        assert_eq!(socket_inode("pipe:[4242]"), None);
        assert_eq!(socket_inode("/dev/null"), None);
        assert_eq!(socket_inode("socket:[x]"), None);
    }

    #[test]
    fn finds_this_process_connection() -> Result<()> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let client = std::net::TcpStream::connect(("127.0.0.1", port))?;
        let (_server, _) = listener.accept()?;
        let mine = connections_to(std::process::id(), port)?;
        assert_eq!(
            mine,
            vec![TcpConn {
                local_port: client.local_addr()?.port(),
                remote_port: port
            }]
        );
        assert!(open_files(std::process::id())? >= 3);
        Ok(())
    }
}
