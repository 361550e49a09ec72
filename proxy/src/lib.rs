//! # ditto-proxy: ditto's networking
//!
//! Two ditto nodes, one at each end of a WAN link, carry LAN TCP flows between them inside a few
//! long-lived, mutually authenticated TLS 1.3 connections ("the tunnel"). Each flow is one
//! multiplexed stream; its bytes go through the dedup engine's encoder on the way in and its decoder
//! on the way out. docs/tunnel.md describes the wire protocol.
//!
//! * [`session`] is the sans-IO state shared with one peer process: streams, sequencing and
//!   acknowledgements, credit, resume across tunnel connections, liveness, hold. No sockets.
//! * [`peer`] is the thin shell around a session (lock, wake-ups, timer, replacement when the peer
//!   restarts); [`link`] moves frames between TLS connections and sessions (dial, accept, hello).
//! * [`stream`] bridges one LAN socket to one stream; [`flows`] decides accelerate vs pass-through
//!   and takes the streams peers open from a channel.
//! * [`node::Node`] wires the parts together; it is the only module that knows them all.
//! * [`intercept`] accepts transparently diverted connections (redirect, tproxy, inline bridge);
//!   [`rules`] owns the nftables tables and policy routing that divert them.
//! * [`tls`] and [`identity`] do the pinned-key authentication; [`hello`] the version handshake.
//! * [`emu`] is a small WAN emulator (delay + rate) for the demo and tests.
//! * [`pacing`] samples tunnel connections (`TCP_INFO`) to pace them to the bottleneck and size
//!   their send buffers; its socket calls (`TCP_INFO`, `SO_MAX_PACING_RATE`, `SO_SNDBUFFORCE`)
//!   are the crate's only unsafe code.

#![deny(unsafe_code)]

pub mod admin;
pub mod allow;
pub mod codec;
pub mod emu;
pub mod flows;
pub mod frame;
pub mod fuzzing;
pub mod group;
pub mod hello;
pub mod identity;
pub mod intercept;
pub mod lifecycle;
pub mod limits;
pub mod link;
pub mod metrics;
pub mod node;
pub mod pacing;
pub mod peer;
pub mod preauth;
pub mod rules;
pub mod session;
pub mod settings;
pub mod sock;
pub mod status;
pub mod stream;
pub mod tls;

pub use allow::{AllowList, AllowRule};
pub use codec::Engine;
pub use flows::ForwardSpec;
pub use group::GroupSpec;
pub use identity::{Fingerprint, Identity};
pub use node::{Node, NodeError, NodeSpec};
pub use peer::PeerSpec;
pub use settings::Settings;
