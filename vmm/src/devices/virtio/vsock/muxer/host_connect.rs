//! Host-initiated connections of the muxer: the listener on `uds_path`,
//! the `CONNECT <port>\n` line each client sends first (bounded, never
//! blocking the device thread), and the non-blocking connect to
//! `<uds_path>_<port>` for guest-initiated ones.

use super::*;

impl VsockMuxer {
    pub(super) fn accept_clients(&mut self) {
        for _ in 0..32 {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    warn!("accept on hybrid vsock listener failed: {e}");
                    return;
                }
            };
            if self.n_pending >= MAX_PENDING_CLIENTS || self.n_conns >= self.cfg.max_connections {
                warn!("too many vsock connections; refusing a host client");
                continue;
            }
            if let Err(e) = stream.set_nonblocking(true) {
                warn!("cannot make a host client non-blocking: {e}");
                continue;
            }
            let Some(token) = self.register(&stream) else {
                continue;
            };
            self.slots.insert(
                token,
                Slot::Pending(PendingClient {
                    stream,
                    line: Vec::with_capacity(MAX_CONNECT_LINE),
                    deadline: Instant::now() + self.cfg.handshake_timeout,
                }),
            );
            self.n_pending += 1;
            self.arm_timer();
            self.read_connect_line(token);
        }
    }

    /// Reads the `CONNECT <port>\n` line byte by byte, so bytes the client sends after it stay
    /// in the socket for the stream.
    pub(super) fn read_connect_line(&mut self, token: u64) {
        let Some(Slot::Pending(p)) = self.slots.get_mut(&token) else {
            return;
        };
        let port = loop {
            let mut b = [0u8; 1];
            match p.stream.read(&mut b) {
                Ok(0) => {
                    debug!("host client closed before CONNECT");
                    return self.drop_pending(token);
                }
                Ok(_) if b[0] == b'\n' => match parse_connect(&p.line) {
                    Some(port) => break port,
                    None => {
                        warn!(line = %String::from_utf8_lossy(&p.line), "bad hybrid vsock command");
                        return self.drop_pending(token);
                    }
                },
                Ok(_) => {
                    p.line.push(b[0]);
                    if p.line.len() > MAX_CONNECT_LINE {
                        warn!("hybrid vsock command line too long");
                        return self.drop_pending(token);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    debug!("host client read failed: {e}");
                    return self.drop_pending(token);
                }
            }
        };
        let Some(Slot::Pending(p)) = self.slots.remove(&token) else {
            return;
        };
        self.n_pending -= 1;
        if self.n_conns >= self.cfg.max_connections {
            warn!("too many vsock connections; refusing CONNECT {port}");
            self.deregister(p.stream.as_raw_fd());
            return;
        }
        let Some(local) = self.alloc_local_port() else {
            warn!("no free local vsock port");
            self.deregister(p.stream.as_raw_fd());
            return;
        };
        let key = ConnKey {
            host_port: local,
            guest_port: port,
        };
        let mut c = Conn::new(key, p.stream, State::Connecting, true);
        c.want_request = true;
        c.deadline = Some(Instant::now() + self.cfg.connect_timeout);
        debug!(guest_port = port, local_port = local, "host CONNECT");
        self.insert_conn(token, c);
        self.arm_timer();
    }

    pub(super) fn drop_pending(&mut self, token: u64) {
        if let Some(Slot::Pending(p)) = self.slots.remove(&token) {
            self.n_pending -= 1;
            self.deregister(p.stream.as_raw_fd());
        }
    }
}

pub(super) fn parse_connect(line: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(line).ok()?;
    let s = s.strip_suffix('\r').unwrap_or(s);
    let port = s.strip_prefix("CONNECT ")?;
    port.trim().parse().ok()
}

pub(super) fn bind_listener(path: &Path) -> Result<UnixListener, MuxerError> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(MuxerError::InUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(|source| MuxerError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
    }
    let l = UnixListener::bind(path).map_err(|source| MuxerError::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    l.set_nonblocking(true).map_err(|source| MuxerError::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(l)
}

/// Connects without ever blocking the device thread: a full backlog counts as refused.
pub(super) fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let fd: OwnedFd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let addr = UnixAddr::new(path)?;
    connect(fd.as_raw_fd(), &addr)?;
    Ok(UnixStream::from(fd))
}
