//! # ditto-proxy: ditto's networking
//!
//! Two ditto nodes, one at each end of a WAN link, carry LAN TCP flows between them inside a few
//! long-lived, mutually authenticated TLS 1.3 connections ("the tunnel"). Each flow is one
//! multiplexed stream; its bytes go through the dedup engine's encoder on the way in and its decoder
//! on the way out. docs/tunnel.md describes the wire protocol.
//!
//! * [`node::Node`] runs everything: tunnel listener and dialers, forward listeners, admin endpoint.
//! * [`mux`] is the per-connection multiplexer (stream table, credit, scheduler).
//! * [`stream`] bridges one LAN socket to one stream; [`flows`] decides accelerate vs pass-through.
//! * [`intercept`] accepts transparently diverted connections (redirect, tproxy, inline bridge);
//!   [`rules`] owns the nftables tables and policy routing that divert them.
//! * [`tls`] and [`identity`] do the pinned-key authentication; [`hello`] the version handshake.
//! * [`emu`] is a small WAN emulator (delay + rate) for the demo and tests.

#![forbid(unsafe_code)]

pub mod admin;
pub mod codec;
pub mod emu;
pub mod flows;
pub mod frame;
pub mod hello;
pub mod identity;
pub mod intercept;
pub mod metrics;
pub mod mux;
pub mod node;
pub mod rules;
pub mod sock;
pub mod stream;
pub mod tls;
pub mod tunnel;

pub use codec::Engine;
pub use identity::{Fingerprint, Identity};
pub use node::{ForwardSpec, Node, NodeError, NodeSpec, PeerSpec, Settings};
