//! The far side out of local ports: connecting from its own address, every connection to the same
//! destination needs a local port of its own. In a network namespace of its own with ten of them
//! (`net.ipv4.ip_local_port_range`), a pair carries sixteen flows to one server that holds them
//! open: the flows that find no port are reset at once (none waits), and the far side's log names
//! the limit and the settings that change it.
//!
//! Needs root (a network namespace); skipped otherwise (failed under CI).

mod common;

use common::netns::{self, Ns};
use common::{daemon_log, start_daemon_with, write_pair};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Echoes what each connection sends, and holds it open until the client closes.
fn serve_echo(l: std::net::TcpListener) {
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
}

/// What one flow got: its echo, an end (reset or close), or nothing in time (hung).
#[derive(Debug, PartialEq)]
enum Outcome {
    Echoed,
    Ended,
    Hung,
}

/// Connects from `127.0.0.<src>` inside `ns`: each client has an address of its own, so the
/// clients' own connections do not run out of the ten ports.
fn connect_from(ns: &Ns, src: u8, to: SocketAddr) -> std::io::Result<TcpStream> {
    ns.run(move || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        let from = SocketAddr::from(([127, 0, 0, src], 0));
        s.bind(&from.into())?;
        s.connect_timeout(&to.into(), Duration::from_secs(5))?;
        Ok(s.into())
    })
}

/// One flow from client `src`; `Err` if the near side did not take its connection.
fn one_flow(ns: &Ns, src: u8, fwd: SocketAddr) -> std::io::Result<(Outcome, Option<TcpStream>)> {
    let mut s = connect_from(ns, src, fwd)?;
    if s.write_all(b"hello").is_err() {
        return Ok((Outcome::Ended, None));
    }
    let _ = s.set_read_timeout(Some(Duration::from_secs(15)));
    let mut buf = [0u8; 5];
    Ok(match s.read_exact(&mut buf) {
        Ok(()) if &buf == b"hello" => (Outcome::Echoed, Some(s)),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            (Outcome::Hung, Some(s))
        }
        _ => (Outcome::Ended, None),
    })
}

#[test]
fn far_side_out_of_local_ports_resets_flows_and_names_the_limit() {
    if netns::skip_unless_root() {
        return;
    }
    let ns = Ns::new(netns::unique("lports"));
    ns.sysctl("net.ipv4.ip_local_port_range=\"40000 40009\"");
    let server: SocketAddr = "127.0.0.1:7070".parse().expect("addr");
    serve_echo(ns.listen(server));
    let dir = tempfile::tempdir().expect("tempdir");
    let p = write_pair(dir.path(), server, "", "", "");
    let _b = start_daemon_with(ns.cmd(env!("CARGO_BIN_EXE_ditto")), &p.cfg_b);
    let _a = start_daemon_with(ns.cmd(env!("CARGO_BIN_EXE_ditto")), &p.cfg_a);
    // Both tunnel connections up before the first flow: a flow that came earlier would pass
    // through, from the near side's own address, and take ports of its own.
    let t0 = Instant::now();
    while daemon_log(&p.cfg_a).matches("tunnel connection up").count() < 2 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the tunnel never came up\n{}\n{}",
            daemon_log(&p.cfg_a),
            daemon_log(&p.cfg_b)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut held = Vec::new();
    let mut src = 2u8;
    match one_flow(&ns, src, p.fwd) {
        Ok((Outcome::Echoed, s)) => held.extend(s),
        r => panic!("the first flow: {r:?}\n{}", daemon_log(&p.cfg_b)),
    }
    let (mut echoed, mut ended) = (1, 0);
    for _ in 1..16 {
        src += 1;
        let started = Instant::now();
        let (o, s) = match one_flow(&ns, src, p.fwd) {
            Ok(r) => r,
            // Taken and reset before the client's connect returned: ended at once too.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => (Outcome::Ended, None),
            Err(e) => panic!(
                "client {src}: the near side refused it: {e}\n{}",
                daemon_log(&p.cfg_a)
            ),
        };
        match o {
            Outcome::Echoed => {
                echoed += 1;
                held.extend(s);
            }
            Outcome::Ended => {
                ended += 1;
                assert!(
                    started.elapsed() < Duration::from_secs(5),
                    "a flow without a port waited {:?} for its end",
                    started.elapsed()
                );
            }
            Outcome::Hung => panic!(
                "a flow hung: neither echoed nor ended\n{}",
                daemon_log(&p.cfg_b)
            ),
        }
    }
    eprintln!("ten local ports, sixteen flows: {echoed} echoed, {ended} ended at once");
    // Ten ports for the far side's connections to the server; the tunnel's and the clients'
    // connections go to other destinations and do not take from them.
    assert!(
        echoed <= 10 && ended >= 6,
        "echoed {echoed}, ended {ended} with ten local ports"
    );
    let log = daemon_log(&p.cfg_b);
    assert!(
        log.contains("local ports to one destination")
            && log.contains("net.ipv4.ip_local_port_range"),
        "the far side did not name the limit:\n{log}"
    );
    drop(held);
}
