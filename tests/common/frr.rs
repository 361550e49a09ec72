//! FRR routing daemons (zebra + bgpd, Debian's `frr` package) run inside a test's network
//! namespace, each instance in its own path space (`-N`), with its config in the test's directory.
//! The daemons are stopped and their run directory removed on drop, also when a test fails.
#![allow(dead_code)]

use super::netns::Ns;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

const BIN: &str = "/usr/lib/frr";

/// Whether FRR is installed (its daemons and the `frr` user they run as).
pub fn available() -> bool {
    Path::new(BIN).join("bgpd").exists()
        && Path::new(BIN).join("zebra").exists()
        && std::fs::read_to_string("/etc/passwd")
            .is_ok_and(|p| p.lines().any(|l| l.starts_with("frr:")))
}

pub struct Frr {
    children: Vec<Child>,
    run_dir: PathBuf,
    pub log: PathBuf,
}

impl Frr {
    /// Starts zebra, then bgpd, in `ns` with these configs (written into `dir`, which must be
    /// readable by the `frr` user). Their output goes to `dir/<ns>-frr.log`.
    pub fn start(ns: &Ns, dir: &Path, zebra: &str, bgpd: &str) -> Frr {
        let space = &ns.name;
        let run_dir = PathBuf::from(format!("/var/run/frr/{space}"));
        std::fs::create_dir_all(&run_dir).expect("FRR run dir");
        let ok = std::process::Command::new("chown")
            .args(["frr:frr"])
            .arg(&run_dir)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "chown frr {}", run_dir.display());
        let log = dir.join(format!("{space}-frr.log"));
        let mut frr = Frr {
            children: Vec::new(),
            run_dir,
            log: log.clone(),
        };
        for (daemon, text) in [("zebra", zebra), ("bgpd", bgpd)] {
            let conf = dir.join(format!("{space}-{daemon}.conf"));
            std::fs::write(&conf, text).expect("FRR config");
            set_mode(&conf, 0o644);
            let out = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .expect("FRR log");
            let err = out.try_clone().expect("FRR log");
            let child = ns
                .cmd(&format!("{BIN}/{daemon}"))
                .args(["-N", space, "-P", "0", "--log", "stdout", "-f"])
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .spawn()
                .unwrap_or_else(|e| panic!("starting {daemon}: {e}"));
            frr.children.push(child);
            if daemon == "zebra" {
                let api = frr.run_dir.join("zserv.api");
                let up = super::netns::wait_until(Duration::from_secs(10), || api.exists());
                assert!(
                    up.is_some(),
                    "zebra in {space} never opened its API:\n{}",
                    frr.log()
                );
            }
        }
        frr
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Frr {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.run_dir);
    }
}

/// `chmod MODE path`.
pub fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// bgpd of an appliance: announces what its kernel table `table` holds (the prefixes ditto puts
/// there while it runs) to the site router at `router`, and accepts nothing from it.
pub fn appliance_bgpd(
    asn: u32,
    id: &str,
    router: &str,
    router_asn: u32,
    prefix: &str,
    table: u32,
) -> String {
    let head = bgp_head(asn, id, prefix, "ANNOUNCE");
    format!(
        "{head} neighbor {router} remote-as {router_asn}
 neighbor {router} timers connect 1
 neighbor {router} advertisement-interval 0
 address-family ipv4 unicast
  redistribute table {table}
  neighbor {router} next-hop-self
  neighbor {router} route-map DENY-ALL in
  neighbor {router} route-map ANNOUNCE out
 exit-address-family
exit
"
    )
}

/// What both ends' bgpd start with: a route-map `permit` passing only `prefix` (and longer), one
/// denying everything, defined before `router bgp` so they hold from the first update, and short
/// timers without batching delays.
fn bgp_head(asn: u32, id: &str, prefix: &str, permit: &str) -> String {
    format!(
        "ip prefix-list SVC seq 5 permit {prefix} le 32
route-map {permit} permit 10
 match ip address prefix-list SVC
exit
route-map DENY-ALL deny 10
exit
bgp route-map delay-timer 0
router bgp {asn}
 bgp router-id {id}
 timers bgp 1 3
 coalesce-time 0
"
    )
}

/// zebra of an appliance: imports kernel table `table` (ditto's announce table).
pub fn appliance_zebra(table: u32) -> String {
    format!("zebra work-queue 0\nip import-table {table}\n")
}

/// bgpd of the site router: learns `prefix` from the appliances (`neighbors`, all in `appl_asn`)
/// and installs up to `paths` of them as equal-cost multipath.
pub fn router_bgpd(
    asn: u32,
    id: &str,
    appl_asn: u32,
    neighbors: &[&str],
    prefix: &str,
    paths: usize,
) -> String {
    let head = bgp_head(asn, id, prefix, "FROM-APPL");
    let mut s = format!(
        "{head} neighbor APPL peer-group
 neighbor APPL remote-as {appl_asn}
 neighbor APPL timers connect 1
 neighbor APPL advertisement-interval 0
"
    );
    for n in neighbors {
        s.push_str(&format!(" neighbor {n} peer-group APPL\n"));
    }
    s.push_str(&format!(
        " address-family ipv4 unicast
  maximum-paths {paths}
  neighbor APPL route-map FROM-APPL in
  neighbor APPL route-map DENY-ALL out
 exit-address-family
exit
"
    ));
    s
}
