//! The guest side of the VM backends: the agent that runs as PID 1 in each
//! sandbox VM ([`agent`]) and the typed messages it exchanges with the host
//! over one virtio-serial port ([`protocol`]), including the egress proxy's
//! connections carried over it ([`tunnel`], the same code at both ends).
//! The host side lives in `agentkernel-vm`; both ends share this crate's
//! protocol so they cannot drift apart.

pub mod agent;
pub mod protocol;
pub mod tunnel;
