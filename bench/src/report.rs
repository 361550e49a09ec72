//! Writes a scenario run as JSON, a Markdown table and two hand-written SVG bar charts.

use crate::scenarios::{RunReport, RunResult};
use anyhow::{Context, Result};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

const COLORS: [&str; 6] = [
    "#6b7280", "#2563eb", "#d97706", "#059669", "#9333ea", "#dc2626",
];

fn contenders(r: &RunReport) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    for x in &r.results {
        if !v.contains(&x.contender) {
            v.push(x.contender.clone());
        }
    }
    v
}

fn find<'a>(r: &'a RunReport, sc: &str, c: &str) -> Option<&'a RunResult> {
    r.results
        .iter()
        .find(|x| x.scenario == sc && x.contender == c)
}

fn mib(kib: u64) -> String {
    format!("{:.0}", kib as f64 / 1024.0)
}

fn cell(x: Option<&RunResult>, f: impl Fn(&RunResult) -> String) -> String {
    match x {
        Some(r) if r.status == "ok" => f(r),
        Some(r) if r.status == "n/a" => "n/a".into(),
        Some(_) => "failed".into(),
        None => "-".into(),
    }
}

fn esc(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

/// The Markdown report (summary matrices and the full table).
pub fn markdown(r: &RunReport) -> String {
    let cs = contenders(r);
    let mut s = String::new();
    let _ = writeln!(s, "## Benchmark run {} ({})\n", r.date, r.machine);
    let _ = writeln!(s, "Tools: {}\n", r.tools.join("; "));
    let _ = writeln!(s, "| scenario | link | workload |\n|---|---|---|");
    for sc in &r.scenarios {
        let link = format!(
            "{}, RTT {}{}{}",
            if sc.rate == "none" {
                "no rate limit".to_string()
            } else {
                sc.rate.clone()
            },
            sc.rtt,
            sc.loss
                .as_ref()
                .map(|l| format!(", loss {l} each way"))
                .unwrap_or_default(),
            sc.client_rcvbuf
                .as_ref()
                .map(|b| format!(", client SO_RCVBUF {b}"))
                .unwrap_or_default()
        );
        let _ = writeln!(s, "| {} | {} | {} |", sc.name, link, esc(&sc.about));
    }
    let header = |s: &mut String, title: &str| {
        let _ = writeln!(s, "\n**{title}**\n");
        let _ = write!(s, "| scenario |");
        for c in &cs {
            let _ = write!(s, " {c} |");
        }
        let _ = write!(s, "\n|---|");
        for _ in &cs {
            let _ = write!(s, "---:|");
        }
        s.push('\n');
    };
    if r.scenarios.iter().any(|sc| sc.outage.is_some()) {
        header(
            &mut s,
            "Outages: did the transfer complete (byte-exact), and its wall time",
        );
        for sc in r.scenarios.iter().filter(|sc| sc.outage.is_some()) {
            let _ = write!(s, "| {} |", sc.name);
            for c in &cs {
                let v = match find(r, &sc.name, c) {
                    Some(x) if x.status == "ok" => format!("completed, {:.1} s", x.wall_s),
                    Some(x) if x.status == "failed" && x.wall_s > 0.0 => {
                        format!("FAILED after {:.1} s", x.wall_s)
                    }
                    Some(x) => x.status.clone(),
                    None => "-".into(),
                };
                let _ = write!(s, " {v} |");
            }
            s.push('\n');
        }
    }
    header(
        &mut s,
        "Goodput, Mbit/s (interactive: median request/response time, ms)",
    );
    for sc in &r.scenarios {
        let _ = write!(s, "| {} |", sc.name);
        for c in &cs {
            let v = cell(find(r, &sc.name, c), |x| match x.rtt_p50_ms {
                Some(p) => format!("{p:.1} ms"),
                None => format!("{:.1}", x.goodput_mbps),
            });
            let _ = write!(s, " {v} |");
        }
        s.push('\n');
    }
    header(
        &mut s,
        "WAN bytes (IP, both directions, from the emulator), MB",
    );
    for sc in &r.scenarios {
        let _ = write!(s, "| {} |", sc.name);
        for c in &cs {
            let v = cell(find(r, &sc.name, c), |x| {
                format!("{:.2}", x.wan_bytes as f64 / 1e6)
            });
            let _ = write!(s, " {v} |");
        }
        s.push('\n');
    }
    let _ = writeln!(
        s,
        "\n**All measurements**\n\n| scenario | contender | status | payload MB | exact | wall s | Mbit/s | WAN MB | WAN/payload | TTFB ms | p50 ms | added ms | CPU A s | CPU B s | RSS A MiB | RSS B MiB | note |\n|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    );
    for x in &r.results {
        let ok = x.status == "ok";
        let opt = |v: Option<f64>| {
            v.filter(|_| ok)
                .map(|v| format!("{v:.1}"))
                .unwrap_or_else(|| "-".into())
        };
        let cpu = |u: &Option<crate::procs::Usage>| {
            u.as_ref()
                .map(|u| format!("{:.2}", u.user_s + u.sys_s))
                .unwrap_or_else(|| "-".into())
        };
        let rss = |u: &Option<crate::procs::Usage>| {
            u.as_ref()
                .map(|u| mib(u.max_rss_kib))
                .unwrap_or_else(|| "-".into())
        };
        let num = |v: String| if ok { v } else { "-".into() };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            x.scenario,
            x.contender,
            x.status,
            num(format!("{:.2}", x.payload_bytes as f64 / 1e6)),
            if ok { if x.exact { "yes" } else { "NO" } } else { "-" },
            num(format!("{:.2}", x.wall_s)),
            num(if x.rtt_p50_ms.is_some() { "-".into() } else { format!("{:.1}", x.goodput_mbps) }),
            num(format!("{:.2}", x.wan_bytes as f64 / 1e6)),
            num(if x.payload_bytes > 0 { format!("{:.3}", x.wan_bytes as f64 / x.payload_bytes as f64) } else { "-".into() }),
            opt(x.ttfb_ms),
            opt(x.rtt_p50_ms),
            opt(x.added_latency_ms),
            cpu(&x.side_a),
            cpu(&x.side_b),
            rss(&x.side_a),
            rss(&x.side_b),
            esc(&x.note)
        );
    }
    let _ = writeln!(
        s,
        "\nSide A = client-side appliance (rsync: the rsync client), side B = server-side appliance (rsync: the daemon). \
         CPU = user+system seconds of that side's processes and their waited-for children over the whole run of the \
         contender (including warm-up); RSS = peak resident set of the largest single process."
    );
    s
}

/// A grouped horizontal bar chart: one group per scenario, one bar per contender.
pub fn bar_chart(
    r: &RunReport,
    title: &str,
    unit: &str,
    value: impl Fn(&RunResult) -> Option<f64>,
) -> String {
    let cs = contenders(r);
    let scs: Vec<&str> = r
        .scenarios
        .iter()
        .map(|s| s.name.as_str())
        .filter(|sc| {
            cs.iter().any(|c| {
                find(r, sc, c)
                    .and_then(|x| if x.status == "ok" { value(x) } else { None })
                    .is_some()
            })
        })
        .collect();
    let max = r
        .results
        .iter()
        .filter(|x| x.status == "ok")
        .filter_map(&value)
        .fold(0.0f64, f64::max)
        .max(1e-9);
    let (left, bar_h, gap, width) = (150.0, 14.0, 12.0, 760.0);
    let plot_w = width - left - 120.0;
    let group_h = cs.len() as f64 * bar_h + gap;
    let top = 50.0;
    let height = top + scs.len() as f64 * group_h + 30.0 + 20.0 * cs.len().div_ceil(3) as f64;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height:.0}" viewBox="0 0 {width} {height:.0}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="10" y="22" font-size="15" font-weight="bold">{}</text>"#,
        xml(title)
    );
    let _ = writeln!(
        s,
        r##"<text x="10" y="38" fill="#555">{} — {}</text>"##,
        xml(unit),
        xml(&r.date)
    );
    for (gi, sc) in scs.iter().enumerate() {
        let gy = top + gi as f64 * group_h;
        let _ = writeln!(
            s,
            r#"<text x="{:.0}" y="{:.1}" text-anchor="end" font-weight="bold">{}</text>"#,
            left - 8.0,
            gy + group_h / 2.0,
            xml(sc)
        );
        for (ci, c) in cs.iter().enumerate() {
            let y = gy + ci as f64 * bar_h;
            let color = COLORS[ci % COLORS.len()];
            let x = find(r, sc, c);
            match x.filter(|x| x.status == "ok").and_then(&value) {
                Some(v) => {
                    let w = (v / max * plot_w).max(1.0);
                    let _ = writeln!(
                        s,
                        r#"<rect x="{left}" y="{y:.1}" width="{w:.1}" height="{:.1}" fill="{color}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
                        bar_h - 2.0,
                        left + w + 4.0,
                        y + bar_h - 4.0,
                        fmt_val(v)
                    );
                }
                None => {
                    let why = x.map(|x| x.status.as_str()).unwrap_or("-");
                    let _ = writeln!(
                        s,
                        r#"<text x="{:.1}" y="{:.1}" fill="{color}">{}</text>"#,
                        left + 4.0,
                        y + bar_h - 4.0,
                        xml(why)
                    );
                }
            }
        }
    }
    let ly = top + scs.len() as f64 * group_h + 10.0;
    for (ci, c) in cs.iter().enumerate() {
        let x = 10.0 + (ci % 3) as f64 * 240.0;
        let y = ly + (ci / 3) as f64 * 20.0;
        let _ = writeln!(
            s,
            r#"<rect x="{x:.0}" y="{y:.0}" width="12" height="12" fill="{}"/><text x="{:.0}" y="{:.0}">{}</text>"#,
            COLORS[ci % COLORS.len()],
            x + 18.0,
            y + 10.0,
            xml(c)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn fmt_val(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Writes `<date>.json`, `<date>.md`, `<date>-throughput.svg`, `<date>-wan-bytes.svg` (with a
/// numeric suffix if files of that date exist) and returns their paths.
pub fn write(r: &RunReport, dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut stem = r.date.clone();
    let mut n = 1;
    while dir.join(format!("{stem}.json")).exists() {
        n += 1;
        stem = format!("{}-{n}", r.date);
    }
    let files = [
        (format!("{stem}.json"), serde_json::to_string_pretty(r)?),
        (format!("{stem}.md"), markdown(r)),
        (
            format!("{stem}-throughput.svg"),
            bar_chart(
                r,
                "Goodput per scenario and contender",
                "Mbit/s (higher is better)",
                |x| x.rtt_p50_ms.is_none().then_some(x.goodput_mbps),
            ),
        ),
        (
            format!("{stem}-wan-bytes.svg"),
            bar_chart(
                r,
                "Bytes on the emulated WAN",
                "MB, both directions, IP level (lower is better)",
                |x| Some(x.wan_bytes as f64 / 1e6),
            ),
        ),
    ];
    let mut out = Vec::new();
    for (name, text) in files {
        let p = dir.join(name);
        std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
        out.push(p);
    }
    Ok(out)
}
