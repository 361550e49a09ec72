//! The monitoring kit (`monitoring/`) against a real Prometheus: two `ditto run` daemons carry a
//! transfer twice, Prometheus scrapes both and evaluates `monitoring/prometheus/ditto-rules.yml`, and
//! every query of the Grafana dashboard and every recording and alerting rule must return data. Then
//! one daemon stops and the tunnel-down and pass-through alerts must fire.
//!
//! Needs the `prometheus` and `promtool` binaries (Debian package `prometheus`) and, for the status
//! page, a headless Chromium (`chromium-headless-shell`); without them the tests are skipped (and fail
//! under CI, see `common/require.rs`).

mod common;

use common::require::{need, skip_without};
use common::{free_port, http_get, start_daemon, start_server, write_pair, PairConfig, Proc};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Two daemons, site-a (dials, forwards `fwd` to an echo server through site-b) and site-b.
struct Pair {
    dir: tempfile::TempDir,
    a: Proc,
    b: Proc,
    admin_a: SocketAddr,
    admin_b: SocketAddr,
    fwd: SocketAddr,
}

fn start_pair() -> Pair {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let target = start_server();
    let PairConfig {
        cfg_a,
        cfg_b,
        admin_a,
        admin_b,
        fwd,
        ..
    } = write_pair(
        d,
        target,
        "store_ram = \"64MiB\"",
        "connections = 2",
        "store_ram = \"64MiB\"",
    );
    let b = start_daemon(&cfg_b);
    let a = start_daemon(&cfg_a);
    Pair {
        dir,
        a,
        b,
        admin_a,
        admin_b,
        fwd,
    }
}

fn wait_tunnel(admin: SocketAddr) {
    // A daemon's first start after a build can be slow on a loaded 2-core machine, and the dialer
    // backs off (0.2 s doubling up to 30 s) while site-b is not listening yet.
    wait_for("site-a's tunnel", 90, || {
        http_get(admin, "/metrics")
            .filter(|m| m.1.contains("ditto_tunnel_connections{peer=\"site-b\"} 2"))
    });
}

fn payload() -> Vec<u8> {
    (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

fn urlencode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Polls `cond` until it yields a value, at most `secs` seconds.
fn wait_for<T>(what: &str, secs: u64, mut cond: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = cond() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

struct Prom {
    addr: SocketAddr,
    _proc: Proc,
}

impl Prom {
    /// `GET /api/v1/<path>`; the `data` of a successful answer.
    fn api(&self, path: &str) -> Result<Value, String> {
        let (code, body) =
            http_get(self.addr, &format!("/api/v1/{path}")).ok_or("no answer from prometheus")?;
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("HTTP {code}: {e}"))?;
        if v["status"] != "success" {
            return Err(format!("HTTP {code}: {body}"));
        }
        Ok(v["data"].clone())
    }

    /// An instant query; the result vector.
    fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let data = self.api(&format!("query?query={}", urlencode(expr)))?;
        match &data["result"] {
            Value::Array(a) => Ok(a.clone()),
            Value::Null => Err(format!("no result: {data}")),
            // A scalar: data all the same.
            other => Ok(vec![other.clone()]),
        }
    }
}

/// The shipped rules with every `for:` set to 0s, so alerts fire as soon as their condition holds.
fn test_rules(shipped: &str) -> String {
    shipped
        .lines()
        .map(|l| {
            let t = l.trim_start();
            if t.starts_with("for:") {
                format!("{}for: 0s", &l[..l.len() - t.len()])
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn start_prometheus(dir: &Path, targets: &[SocketAddr]) -> Prom {
    let shipped = std::fs::read_to_string(repo().join("monitoring/prometheus/ditto-rules.yml"))
        .expect("read rules");
    std::fs::write(dir.join("rules.yml"), test_rules(&shipped)).expect("write rules");
    let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - rules.yml\n\
             scrape_configs:\n  - job_name: ditto\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        ),
    )
    .expect("write config");
    let addr = free_port();
    let log = std::fs::File::create(dir.join("prometheus.log")).expect("log");
    let child = Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={addr}"))
        .arg("--log.level=warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn prometheus");
    let prom = Prom {
        addr,
        _proc: Proc(child),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_get(addr, "/-/ready").map(|r| r.0) != Some(200) {
        if Instant::now() >= deadline {
            panic!(
                "prometheus not ready; its log:\n{}",
                std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    prom
}

/// Splits a PromQL expression at its top-level set operators (`and`, `or`, `unless`) and comparisons,
/// returning the operands: an alert's condition is "these series exist and compare so".
fn operands(expr: &str) -> Vec<String> {
    let b = expr.as_bytes();
    let (mut depth, mut quote, mut start, mut i) = (0i32, None::<u8>, 0, 0);
    let mut out = Vec::new();
    let word_at = |i: usize, w: &str| {
        b[i..].starts_with(w.as_bytes())
            && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_'))
            && !matches!(b.get(i + w.len()), Some(c) if c.is_ascii_alphanumeric() || *c == b'_' || *c == b':')
    };
    while i < b.len() {
        let c = b[i];
        if let Some(q) = quote {
            if c == b'\\' {
                i += 1;
            } else if c == q {
                quote = None;
            }
            i += 1;
            continue;
        }
        let op_len = match c {
            b'"' | b'\'' | b'`' => {
                quote = Some(c);
                0
            }
            b'(' | b'{' | b'[' => {
                depth += 1;
                0
            }
            b')' | b'}' | b']' => {
                depth -= 1;
                0
            }
            _ if depth > 0 => 0,
            b'=' | b'!' | b'<' | b'>' if b.get(i + 1) == Some(&b'=') => 2,
            b'<' | b'>' => 1,
            _ => ["and", "or", "unless"]
                .iter()
                .find(|w| word_at(i, w))
                .map_or(0, |w| w.len()),
        };
        if op_len > 0 {
            out.push(expr[start..i].to_owned());
            i += op_len;
            // A `bool` modifier belongs to the operator.
            let rest = expr[i..].trim_start();
            if rest.starts_with("bool ") {
                i = expr.len() - rest.len() + 4;
            }
            start = i;
        } else {
            i += 1;
        }
    }
    out.push(expr[start..].to_owned());
    out.into_iter()
        .map(|s| s.trim().to_owned())
        .filter(|s| s.parse::<f64>().is_err())
        .collect()
}

/// Metric names an expression selects (identifiers outside braces, brackets and strings that are not
/// functions, keywords or label lists of `by`/`on`/...).
fn metric_names(expr: &str) -> Vec<String> {
    const KEYWORDS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "and",
        "or",
        "unless",
        "bool",
        "offset",
    ];
    let b = expr.as_bytes();
    let (mut depth, mut quote, mut i) = (0i32, None::<u8>, 0);
    let mut names = Vec::new();
    let mut label_list_next = false;
    let mut paren_is_labels = Vec::new();
    while i < b.len() {
        let c = b[i];
        if let Some(q) = quote {
            if c == b'\\' {
                i += 1;
            } else if c == q {
                quote = None;
            }
            i += 1;
            continue;
        }
        match c {
            b'"' | b'\'' | b'`' => quote = Some(c),
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth -= 1,
            b'(' => {
                paren_is_labels.push(label_list_next);
                label_list_next = false;
            }
            b')' => {
                paren_is_labels.pop();
            }
            _ if depth == 0
                && (c.is_ascii_alphabetic() || c == b'_' || c == b':')
                && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'.')) =>
            {
                let start = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b':')
                {
                    i += 1;
                }
                let word = &expr[start..i];
                let next = expr[i..].trim_start();
                if [
                    "by",
                    "without",
                    "on",
                    "ignoring",
                    "group_left",
                    "group_right",
                ]
                .contains(&word)
                {
                    label_list_next = true;
                } else if !KEYWORDS.contains(&word)
                    && !next.starts_with('(')
                    && !next.starts_with("by")
                    && !next.starts_with("without")
                    && !paren_is_labels.last().copied().unwrap_or(false)
                {
                    names.push(word.to_owned());
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    names
}

/// The dashboard's queries with Grafana's variables replaced, and the selectors of its variables.
fn dashboard_queries(dash: &Value) -> (Vec<(String, String)>, Vec<String>) {
    let vars = dash["templating"]["list"].as_array().expect("templating");
    let substitute = |e: &str| {
        let mut e = e
            .replace("$__rate_interval", "30s")
            .replace("$__interval", "15s")
            .replace("$__range", "5m");
        for v in vars {
            let name = v["name"].as_str().expect("variable name");
            e = e
                .replace(&format!("${{{name}}}"), ".*")
                .replace(&format!("${name}"), ".*");
        }
        assert!(!e.contains('$'), "unknown variable left in {e}");
        e
    };
    let mut exprs = Vec::new();
    let mut stack: Vec<&Value> = dash["panels"].as_array().expect("panels").iter().collect();
    while let Some(p) = stack.pop() {
        stack.extend(p["panels"].as_array().into_iter().flatten());
        let title = p["title"].as_str().unwrap_or("?");
        for t in p["targets"].as_array().into_iter().flatten() {
            let e = t["expr"].as_str().expect("target expr");
            exprs.push((title.to_owned(), substitute(e)));
        }
    }
    let mut selectors = Vec::new();
    for v in vars.iter().filter(|v| v["type"] == "query") {
        let q = v["query"]
            .as_str()
            .or(v["query"]["query"].as_str())
            .expect("variable query");
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|r| r.rsplit_once(','))
            .expect("label_values(selector, label)")
            .0;
        selectors.push(substitute(inner));
    }
    (exprs, selectors)
}

fn check_dashboard_shape(dash: &Value) {
    let vars = dash["templating"]["list"].as_array().expect("templating");
    let ds = vars
        .iter()
        .find(|v| v["type"] == "datasource")
        .expect("a data source variable");
    assert_eq!(ds["query"], "prometheus");
    let ds_ref = format!("${{{}}}", ds["name"].as_str().expect("name"));
    for name in ["instance", "peer"] {
        assert!(
            vars.iter()
                .any(|v| v["name"] == name && v["type"] == "query"),
            "no {name} variable"
        );
    }
    let mut ids = std::collections::HashSet::new();
    for p in dash["panels"].as_array().expect("panels") {
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "duplicate id"
        );
        assert!(p["gridPos"]["w"].as_u64().is_some(), "no gridPos");
        if p["type"] != "row" {
            assert_eq!(p["datasource"]["uid"], ds_ref.as_str(), "{}", p["title"]);
            assert!(!p["targets"].as_array().expect("targets").is_empty());
        }
    }
}

/// Queries each (what, expr) until it returns data; panics listing those that never did.
fn all_return_data(prom: &Prom, checks: &[(String, String)]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut pending: Vec<&(String, String)> = checks.iter().collect();
    loop {
        let mut failed = Vec::new();
        for c in pending {
            match prom.query(&c.1) {
                Ok(r) if !r.is_empty() => {}
                Ok(_) => failed.push((c, "no data".to_owned())),
                Err(e) => failed.push((c, e)),
            }
        }
        if failed.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            let list: Vec<String> = failed
                .iter()
                .map(|((what, e), err)| format!("{what}: {e}\n    -> {err}"))
                .collect();
            panic!("queries without data:\n{}", list.join("\n"));
        }
        pending = failed.into_iter().map(|f| f.0).collect();
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn transfer(fwd: SocketAddr, payload: &[u8]) {
    let mut s = TcpStream::connect(fwd).expect("connect forward");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    s.write_all(payload).expect("send");
    s.shutdown(Shutdown::Write).expect("half-close");
    let mut back = Vec::new();
    s.read_to_end(&mut back).expect("reply");
    back.reverse();
    assert!(back == payload, "reply differs");
}

fn promtool(args: &[&str]) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(repo())
        .output()
        .expect("spawn promtool");
    assert!(
        out.status.success(),
        "promtool {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn operand_and_metric_name_parsing() {
    assert_eq!(
        operands("a:b < 0.5 * c{x=\"a and b\"} and d > 100e3"),
        ["a:b", "0.5 * c{x=\"a and b\"}", "d"]
    );
    assert_eq!(
        operands("sum by (job) (increase(x_total{reason!=\"y\"}[10m])) > 0"),
        ["sum by (job) (increase(x_total{reason!=\"y\"}[10m]))"]
    );
    assert_eq!(operands("up == bool 0"), ["up"]);
    assert_eq!(
        metric_names(
            "sum by (instance, peer) (rate(ditto_lan_bytes_total{p=~\"a\"}[30s])) / on (instance) ditto:x:rate5m > 1e5"
        ),
        ["ditto_lan_bytes_total", "ditto:x:rate5m"]
    );
}

#[test]
fn dashboard_and_rules_against_prometheus() {
    let started = Instant::now();
    if skip_without(
        have("prometheus") && have("promtool"),
        "`prometheus` and `promtool` (apt-get install prometheus)",
    ) {
        return;
    }
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("monitoring/grafana/ditto-dashboard.json"))
            .expect("read dashboard"),
    )
    .expect("dashboard JSON");
    check_dashboard_shape(&dash);
    promtool(&["check", "rules", "monitoring/prometheus/ditto-rules.yml"]);
    promtool(&["check", "config", "monitoring/prometheus/prometheus.yml"]);

    let Pair {
        dir,
        a: _a,
        b,
        admin_a,
        admin_b,
        fwd,
    } = start_pair();
    let d = dir.path();
    let prom_dir = d.join("prom");
    std::fs::create_dir(&prom_dir).expect("mkdir");
    let prom = start_prometheus(&prom_dir, &[admin_a, admin_b]);
    wait_tunnel(admin_a);

    // A first scrape of both before any traffic, so that rates see the transfers.
    wait_for("prometheus to scrape both appliances", 20, || {
        let r = prom
            .query("ditto_lan_bytes_total{direction=\"sent\"} == 0")
            .ok()?;
        (r.len() == 2).then_some(())
    });
    let payload = payload();
    transfer(fwd, &payload);
    transfer(fwd, &payload);
    let sent = 2.0 * payload.len() as f64;

    // Prometheus has scraped both appliances after the transfers.
    wait_for("prometheus to scrape the transfers", 20, || {
        let r = prom
            .query("sum by (instance) (ditto_lan_bytes_total{direction=\"sent\"})")
            .ok()?;
        let got: Vec<f64> = r
            .iter()
            .filter_map(|s| s["value"][1].as_str()?.parse().ok())
            .collect();
        (got.len() == 2 && got.iter().all(|v| *v >= sent)).then_some(())
    });

    // Metric names: the dashboard uses only what ditto exports.
    let exported = http_get(admin_a, "/metrics").expect("metrics").1;
    let (panel_exprs, var_selectors) = dashboard_queries(&dash);
    for (title, e) in &panel_exprs {
        for name in metric_names(e) {
            assert!(
                exported.contains(&format!("\n{name}")) && name.starts_with("ditto_"),
                "panel {title:?} uses {name}, which ditto does not export"
            );
        }
    }

    // The rules as Prometheus loaded them.
    let groups = prom.api("rules").expect("rules");
    let mut checks: Vec<(String, String)> = Vec::new();
    let mut alerts = Vec::new();
    for g in groups["groups"].as_array().expect("groups") {
        for r in g["rules"].as_array().expect("rules") {
            let name = r["name"].as_str().expect("name").to_owned();
            let q = r["query"].as_str().expect("query").to_owned();
            if r["type"] == "recording" {
                checks.push((format!("recording rule {name}"), q));
                checks.push((format!("recorded series {name}"), name));
            } else {
                for (i, o) in operands(&q).into_iter().enumerate() {
                    checks.push((format!("alert {name} operand {i}"), o));
                }
                alerts.push((name, q));
            }
        }
    }
    assert!(checks.len() >= 20, "rules not loaded: {groups}");
    for (title, e) in panel_exprs {
        checks.push((format!("panel {title:?}"), e));
    }
    for s in var_selectors {
        checks.push((format!("variable selector {s}"), s));
    }
    all_return_data(&prom, &checks);
    // Every alert expression evaluates (no data is fine: nothing is wrong yet).
    for (name, q) in &alerts {
        prom.query(q)
            .unwrap_or_else(|e| panic!("alert {name}: {e}"));
    }
    for g in groups["groups"].as_array().expect("groups") {
        for r in g["rules"].as_array().expect("rules") {
            assert_eq!(r["health"], "ok", "rule unhealthy: {r}");
        }
    }
    // Site-a's reduction ratio (recorded up to one evaluation after the scrape), and the second pass
    // deduplicated.
    let value = |expr: &str| -> Option<f64> {
        let r = prom.query(expr).ok()?;
        r.first()?["value"][1].as_str()?.parse().ok()
    };
    let ratio = wait_for("site-a's recorded reduction ratio", 10, || {
        value(&format!(
            "ditto:peer_wan_reduction_ratio:rate5m{{instance=\"{admin_a}\", peer=\"site-b\"}}"
        ))
    });
    assert!(ratio > 1.5, "reduction ratio {ratio}");
    let dedup = value(&format!(
        "ditto_dedup_saved_bytes_total{{instance=\"{admin_a}\"}}"
    ))
    .expect("dedup savings");
    assert!(dedup >= payload.len() as f64 / 2.0, "dedup saved {dedup}");

    // Site-b stops: site-a's tunnel goes down, and its flows pass through.
    drop(b);
    wait_for("site-a to see the tunnel down", 30, || {
        http_get(admin_a, "/metrics").filter(|m| m.1.contains("ditto_tunnel_up{peer=\"site-b\"} 0"))
    });
    transfer(fwd, &payload[..100_000]);
    let firing = |alert: &str, label: &str| {
        let data = prom.api("alerts").ok()?;
        data["alerts"]
            .as_array()?
            .iter()
            .any(|a| {
                a["labels"]["alertname"] == alert
                    && a["state"] == "firing"
                    && a["labels"].to_string().contains(label)
            })
            .then_some(())
    };
    let site_a = format!("\"instance\":\"{admin_a}\"");
    wait_for("DittoTunnelDown to fire", 60, || {
        firing("DittoTunnelDown", &site_a)?;
        firing("DittoTunnelDown", "\"peer\":\"site-b\"")
    });
    wait_for("DittoTrafficPassingThrough to fire", 30, || {
        firing("DittoTrafficPassingThrough", "\"reason\":\"peer-down\"")
    });
    // Nothing wrong with the data: no verification or store alert.
    let data = prom.api("alerts").expect("alerts");
    for a in data["alerts"].as_array().expect("alerts") {
        let name = a["labels"]["alertname"].as_str().unwrap_or("");
        assert!(
            !["DittoVerifyFailures", "DittoStoreErrors"].contains(&name),
            "unexpected alert {a}"
        );
    }
    eprintln!(
        "monitoring test: {} queries checked in {:.1}s",
        checks.len(),
        started.elapsed().as_secs_f64()
    );
}

fn chromium() -> Option<&'static str> {
    ["chromium-headless-shell", "chromium", "chromium-browser"]
        .into_iter()
        .find(|c| have(c))
}

/// The status page at `/`: self-contained, fed by `/status` and `/history`, rendered by a headless
/// Chromium (DOM after the scripts ran, and a screenshot).
#[test]
fn status_page_renders_in_headless_chromium() {
    let pair = start_pair();
    wait_tunnel(pair.admin_a);
    let payload = payload();
    transfer(pair.fwd, &payload);
    transfer(pair.fwd, &payload);

    let (code, page) = http_get(pair.admin_a, "/").expect("GET /");
    assert_eq!(code, 200);
    assert!(page.contains("<svg id=\"chart-throughput\""), "{page}");
    for external in [
        "src=\"http",
        "href=\"http",
        "src=\"//",
        "href=\"//",
        "@import",
    ] {
        assert!(!page.contains(external), "the page loads {external}");
    }
    let (code, history) = http_get(pair.admin_a, "/history").expect("GET /history");
    assert_eq!(code, 200);
    let history: Vec<Value> = serde_json::from_str(&history).expect("history JSON");
    assert!(history.len() >= 2, "{history:?}");
    let last = history.last().expect("a sample");
    assert!(last["lan_sent"].as_u64() >= Some(2 * payload.len() as u64));
    assert!(last["t"].as_f64() > history[0]["t"].as_f64());

    let Some(chrome) = need(
        chromium(),
        "a headless Chromium (apt-get install chromium-headless-shell)",
    ) else {
        return;
    };
    let url = format!("http://{}/", pair.admin_a);
    let profile = pair.dir.path().join("chromium-profile");
    let run = |extra: &[String]| {
        let out = Command::new(chrome)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--hide-scrollbars",
                "--virtual-time-budget=3000",
                "--window-size=1200,900",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(extra)
            .arg(&url)
            .stdin(Stdio::null())
            .output()
            .expect("spawn chromium");
        assert!(
            out.status.success(),
            "{chrome} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    let dom = String::from_utf8_lossy(&run(&["--dump-dom".to_owned()]).stdout).into_owned();
    // The scripts fetched /status and /history and drew them.
    assert!(
        dom.contains("<td>site-b</td>"),
        "peer table missing:\n{dom}"
    );
    assert!(
        dom.contains("class=\"up\">up<"),
        "tunnel not shown up:\n{dom}"
    );
    assert!(
        dom.contains("<div id=\"error\" style=\"display: none;\"></div>"),
        "error shown:\n{dom}"
    );
    let ratio_at = dom.find("id=\"ratio\">").expect("ratio card") + "id=\"ratio\">".len();
    assert!(
        dom[ratio_at..].starts_with(|c: char| c.is_ascii_digit()),
        "no ratio: {}",
        &dom[ratio_at..ratio_at + 40]
    );
    assert!(
        dom.contains("data-series=\"lan_sent\"") && dom.contains("data-series=\"dedup_saved\""),
        "charts not drawn:\n{dom}"
    );
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ditto-status-page.png");
    let _ = std::fs::remove_file(&shot);
    run(&[format!("--screenshot={}", shot.display())]);
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(
        png.len() > 10_000,
        "screenshot suspiciously small: {} bytes",
        png.len()
    );
    eprintln!("status page screenshot: {}", shot.display());
}
