//! Per-instance SSH endpoints ([`FakeConfig::ssh_per_instance`](super::FakeConfig)): every
//! instance gets its own loopback port that forwards to the configured SSH endpoint, and that
//! port behaves like the machine's sshd would. Connections are refused until the instance runs.
//! When the instance exits, is outbid, stopped or destroyed, the open connections are closed and
//! new ones refused. When its host goes offline, the open connections go silent: nothing more is
//! forwarded either way, as with a host that dropped off the network. The silence lasts until
//! the instance is destroyed or stops being offline, and then the connection is closed.
//! So a test that kills an instance also cuts the operator off from it, while the trainer
//! processes it started (on the shared SSH endpoint's machine) are the test's to stop.

use std::net::SocketAddr;
use std::sync::Weak;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use super::Shared;

/// How often an endpoint looks at its instance's state.
const POLL: Duration = Duration::from_millis(100);

/// What the machine's SSH does now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Reach {
    /// Running: connections are forwarded.
    Open,
    /// Not running yet, or stopped/exited: connections are refused and open ones closed.
    Closed,
    /// The host is offline: open connections go silent, new ones get no answer.
    Silent,
    /// The instance no longer exists: the endpoint stops listening.
    Gone,
}

/// Binds the endpoint of one instance on `host`, on `preferred` when it is free (a fake that
/// loaded its state file keeps the ports it reported), else on any free port.
pub(super) fn bind(host: &str, preferred: Option<u16>) -> std::io::Result<std::net::TcpListener> {
    let listener = match preferred.map(|port| std::net::TcpListener::bind((host, port))) {
        Some(Ok(listener)) => listener,
        _ => std::net::TcpListener::bind((host, 0))?,
    };
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Serves the endpoint of instance `id` until the instance is gone (or the fake is dropped).
/// Must be called inside a Tokio runtime.
pub(super) fn spawn(shared: Weak<Shared>, id: i64, listener: std::net::TcpListener, upstream: SocketAddr) {
    tokio::spawn(async move {
        let Ok(listener) = TcpListener::from_std(listener) else { return };
        let mut silent: Vec<TcpStream> = Vec::new();
        loop {
            let now = reach(&shared, id);
            if now == Reach::Gone {
                return;
            }
            if now != Reach::Silent {
                // An offline host's unanswered connections end when it comes back or goes.
                silent.clear();
            }
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = tokio::time::sleep(POLL) => continue,
            };
            let Ok((client, _)) = accepted else { continue };
            match reach(&shared, id) {
                Reach::Open => {
                    tokio::spawn(forward(shared.clone(), id, client, upstream));
                }
                Reach::Silent => silent.push(client),
                Reach::Closed | Reach::Gone => drop(client),
            }
        }
    });
}

/// What instance `id`'s SSH does now, from the fake's state.
fn reach(shared: &Weak<Shared>, id: i64) -> Reach {
    match shared.upgrade() {
        Some(shared) => shared.ssh_reach(id),
        None => Reach::Gone,
    }
}

/// One connection: bytes both ways while the instance runs.
async fn forward(shared: Weak<Shared>, id: i64, mut client: TcpStream, upstream: SocketAddr) {
    let Ok(mut server) = TcpStream::connect(upstream).await else { return };
    let ended = tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => return,
        ended = async {
            loop {
                tokio::time::sleep(POLL).await;
                let now = reach(&shared, id);
                if now != Reach::Open {
                    return now;
                }
            }
        } => ended,
    };
    drop(server);
    if ended == Reach::Silent {
        // Hold the client's socket, answering nothing, while the host stays offline.
        while reach(&shared, id) == Reach::Silent {
            tokio::time::sleep(POLL).await;
        }
    }
}
