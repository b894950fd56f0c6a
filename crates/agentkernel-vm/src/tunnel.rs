//! The host's end of a VM's egress tunnel (`agentkernel_guest::tunnel`):
//! each connection the guest opens to the proxy's port on its loopback
//! becomes a socket pair here, one end sent to the egress proxy process
//! over the run's private handoff socket, the other carrying the
//! connection's frames. The proxy has no address on the host at all.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use crate::protocol::HostMessage;

pub type Tunnels = Arc<agentkernel_guest::tunnel::Tunnels<UnixStream>>;

/// Tunnels whose frames go out on `port` and whose connections go to the
/// proxy behind `handoff` (`agentkernel_native::egress::StartedProxy`).
pub fn to_proxy(handoff: OwnedFd, port: Arc<Mutex<UnixStream>>) -> Tunnels {
    agentkernel_guest::tunnel::Tunnels::new(
        move |frame| crate::session::send(&port, &HostMessage::Tunnel(frame)),
        Some(Box::new(move || {
            let (ours, proxys) = UnixStream::pair()?;
            agentkernel_native::egress::send_connection(&handoff, &proxys)?;
            Ok(ours)
        })),
    )
}
