//! ditto's benchmark kit: a packet-level WAN emulator (`ditto-wanem`), a network-namespace
//! topology (client, site A, WAN, site B, server), traffic tools and the scenario runner.

pub mod bridged;
pub mod link;
pub mod linktest;
pub mod load;
pub mod modes;
pub mod procs;
pub mod report;
pub mod scenarios;
pub mod soak;
pub mod sys;
pub mod topo;
pub mod traffic;
pub mod units;
pub mod wanem;
