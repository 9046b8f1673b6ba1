//! One epoll thread serving all device back-ends (queue notifications, sockets, taps), so that
//! vCPU threads only ever do short, non-blocking work.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::devices::bus::lock;

/// Something that reacts to readiness of one or more file descriptors.
pub trait EventHandler: Send {
    fn handle(&mut self, fd: RawFd, events: EventSet);
}

pub struct EventLoop {
    epoll: Epoll,
    handlers: Mutex<HashMap<RawFd, Arc<Mutex<dyn EventHandler>>>>,
    stop: EventFd,
}

impl EventLoop {
    pub fn new() -> io::Result<Arc<Self>> {
        let epoll = Epoll::new()?;
        let stop = EventFd::new(EFD_NONBLOCK)?;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, stop.as_raw_fd() as u64),
        )?;
        Ok(Arc::new(EventLoop {
            epoll,
            handlers: Mutex::new(HashMap::new()),
            stop,
        }))
    }

    pub fn add(
        &self,
        fd: RawFd,
        events: EventSet,
        handler: Arc<Mutex<dyn EventHandler>>,
    ) -> io::Result<()> {
        lock(&self.handlers).insert(fd, handler);
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(events, fd as u64),
        )
    }

    pub fn modify(&self, fd: RawFd, events: EventSet) -> io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Modify,
            fd,
            EpollEvent::new(events, fd as u64),
        )
    }

    pub fn remove(&self, fd: RawFd) {
        lock(&self.handlers).remove(&fd);
        // The fd may already be closed; nothing else to undo then.
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
    }

    /// Serves events until `stop` is called.
    pub fn run(&self) {
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("epoll_wait: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                let fd = ev.fd();
                if fd == self.stop.as_raw_fd() {
                    return;
                }
                let handler = lock(&self.handlers).get(&fd).cloned();
                if let Some(h) = handler {
                    lock(&h).handle(fd, ev.event_set());
                }
            }
        }
    }

    pub fn stop(&self) {
        let _ = self.stop.write(1);
    }
}
