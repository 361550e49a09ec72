//! Two sites joined by the project's WAN emulator, run inside the test process (ditto-bench's
//! [`Emulator`]): namespace `a` (site A and its clients) ─ wan0 ⇐ emulator ⇒ wan0 ─ namespace `b`
//! (site B and its servers). The emulator's TUN devices are made in a third namespace and moved
//! into `a` and `b`; the link can be taken down (every packet dropped, both directions) and
//! brought back at any time. Everything is removed on drop, also when a test fails.
#![allow(dead_code)]

use super::netns::{unique, Ns};
use ditto_bench::wanem::{Emulator, StatsReport, WanemArgs};

/// Site A's address on the emulated link.
pub const A_IP: &str = "10.64.0.1";
/// Site B's address on the emulated link.
pub const B_IP: &str = "10.64.0.2";

pub struct Wan {
    // Dropped first: the forwarding threads stop before the namespaces go.
    emu: Emulator,
    pub a: Ns,
    pub b: Ns,
    _wan: Ns,
}

impl Wan {
    /// Namespaces `<tag>…a`, `<tag>…b` joined by an emulated link with `link` settings
    /// (`ditto-wanem` options, e.g. `["--rate", "20mbit", "--delay", "40ms"]`).
    pub fn new(tag: &str, link: &[&str]) -> Wan {
        let p = unique(tag);
        let a = Ns::new(format!("{p}a"));
        let b = Ns::new(format!("{p}b"));
        let wan = Ns::new(format!("{p}w"));
        let mut args: Vec<String> = vec![
            "--a-netns".into(),
            a.name.clone(),
            "--b-netns".into(),
            b.name.clone(),
            "--a-addr".into(),
            format!("{A_IP}/30"),
            "--b-addr".into(),
            format!("{B_IP}/30"),
            // Ordinary scheduling: the tests share the machine with each other.
            "--rt-priority".into(),
            "0".into(),
        ];
        args.extend(link.iter().map(|s| s.to_string()));
        let args = WanemArgs::from_args(args).expect("emulator options");
        // Made inside the WAN namespace (the `ip` commands it runs inherit this thread's).
        let emu = wan
            .run(move || Emulator::start(&args, &[]))
            .unwrap_or_else(|e| panic!("starting the WAN emulator: {e:#}"));
        Wan {
            emu,
            a,
            b,
            _wan: wan,
        }
    }

    /// Takes the link down (drop everything, both directions) or brings it back up.
    pub fn set_down(&self, down: bool) {
        self.emu.set_down(down);
    }

    /// The emulator's counters now.
    pub fn stats(&self) -> StatsReport {
        self.emu.report()
    }

    /// Packets the outages dropped so far, both directions.
    pub fn outage_drops(&self) -> u64 {
        let s = self.emu.report();
        s.ab.drop_outage_packets + s.ba.drop_outage_packets
    }
}
