//! A TCP relay in front of a daemon that can be made to swallow connections, as a server
//! that lost power or hung does: connections are still accepted (the kernel's backlog
//! does that for a hung process) but nothing is ever answered.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Relays 127.0.0.1:`addr().port()` to its target until [`Relay::swallow`]; stops when
/// dropped.
pub struct Relay {
    addr: SocketAddr,
    swallowing: Arc<AtomicBool>,
    /// The connections being relayed, cut by `swallow`.
    relayed: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Relay {
    /// A relay to `target` on a new port of 127.0.0.1.
    ///
    /// # Panics
    /// When no port can be bound.
    pub async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("relay addr");
        let swallowing = Arc::new(AtomicBool::new(false));
        let relayed: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = tokio::spawn({
            let (swallowing, relayed) = (Arc::clone(&swallowing), Arc::clone(&relayed));
            async move {
                // Swallowed connections are held open here, unread, until the relay drops.
                let mut held: Vec<TcpStream> = Vec::new();
                loop {
                    let Ok((mut client, _)) = listener.accept().await else {
                        continue;
                    };
                    if swallowing.load(Ordering::SeqCst) {
                        held.push(client);
                        continue;
                    }
                    let task = tokio::spawn(async move {
                        if let Ok(mut server) = TcpStream::connect(target).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    });
                    let mut relayed = relayed.lock().expect("lock");
                    relayed.retain(|task| !task.is_finished());
                    relayed.push(task);
                }
            }
        });
        Relay {
            addr,
            swallowing,
            relayed,
            accept,
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// From now on connections are accepted and never answered; those being relayed are
    /// cut.
    pub fn swallow(&self) {
        self.swallowing.store(true, Ordering::SeqCst);
        for task in self.relayed.lock().expect("lock").drain(..) {
            task.abort();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
        for task in self.relayed.lock().expect("lock").drain(..) {
            task.abort();
        }
    }
}
