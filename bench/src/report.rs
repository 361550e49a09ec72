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
        "\n**All measurements**\n\n| scenario | contender | status | payload MB | exact | wall s | Mbit/s | WAN MB | WAN/payload | TTFB ms (p50, p99) | p50 ms | added ms | CPU A s | CPU B s | RSS A MiB | RSS B MiB | note |\n|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
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
            match x.ttfb_p99_ms.filter(|_| ok) {
                Some(p99) => format!("{}, {p99:.1}", opt(x.ttfb_ms)),
                None => opt(x.ttfb_ms),
            },
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

/// The contender every other is compared with.
const BASELINE: &str = "plain";

/// A grouped horizontal bar chart of each contender's `value` relative to plain TCP's in the same
/// scenario, on a log axis: what a reader compares is a contender against plain in one scenario,
/// and those ratios span from thousandths to thousands. Each bar is labelled with the ratio and the
/// measured value (`fmt` formats it, with its unit). Scenarios without a plain result are left out.
pub fn ratio_chart(
    r: &RunReport,
    title: &str,
    subtitle: &str,
    value: impl Fn(&RunResult) -> Option<f64>,
    fmt: impl Fn(f64) -> String,
) -> String {
    let cs = contenders(r);
    let ok = |sc: &str, c: &str| {
        find(r, sc, c)
            .filter(|x| x.status == "ok")
            .and_then(&value)
            .filter(|v| *v > 0.0 && v.is_finite())
    };
    let scs: Vec<&str> = r
        .scenarios
        .iter()
        .map(|s| s.name.as_str())
        .filter(|sc| ok(sc, BASELINE).is_some())
        .collect();
    let ratios = scs.iter().flat_map(|sc| {
        let base = ok(sc, BASELINE).unwrap_or(1.0);
        cs.iter().filter_map(move |c| ok(sc, c).map(|v| v / base))
    });
    let (lo, hi) = ratios.fold((1.0f64, 1.0f64), |(lo, hi), q| (lo.min(q), hi.max(q)));
    let lo_dec = lo.log10().floor() as i32;
    let hi_dec = (hi.log10().ceil() as i32).max(lo_dec + 1);
    let (left, bar_h, gap, width) = (150.0, 14.0, 12.0, 820.0);
    let plot_w = width - left - 190.0;
    let x_of =
        |q: f64| left + (q.log10() - f64::from(lo_dec)) / f64::from(hi_dec - lo_dec) * plot_w;
    let group_h = cs.len() as f64 * bar_h + gap;
    let top = 64.0;
    let plot_bottom = top + scs.len() as f64 * group_h;
    let height = plot_bottom + 40.0 + 20.0 * cs.len().div_ceil(3) as f64;
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
        xml(subtitle),
        xml(&r.date)
    );
    // Decade grid lines, the baseline (1x) darker.
    for d in lo_dec..=hi_dec {
        let q = 10f64.powi(d);
        let x = x_of(q);
        let (stroke, w) = if d == 0 { ("#111", 1.5) } else { ("#ddd", 1.0) };
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{plot_bottom:.1}" stroke="{stroke}" stroke-width="{w}"/><text x="{x:.1}" y="{:.1}" text-anchor="middle" fill="#555">{}</text>"##,
            top - 10.0,
            top - 14.0,
            xml(&fmt_ratio(q))
        );
    }
    for (gi, sc) in scs.iter().enumerate() {
        let gy = top + gi as f64 * group_h;
        let base = ok(sc, BASELINE).unwrap_or(1.0);
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
            let one = x_of(1.0);
            match ok(sc, c) {
                Some(v) => {
                    let q = v / base;
                    let x = x_of(q);
                    let (x0, w) = (one.min(x), (x - one).abs().max(1.5));
                    let _ = writeln!(
                        s,
                        r#"<rect x="{x0:.1}" y="{y:.1}" width="{w:.1}" height="{:.1}" fill="{color}"/><text x="{:.1}" y="{:.1}">{} · {}</text>"#,
                        bar_h - 2.0,
                        one.max(x) + 4.0,
                        y + bar_h - 4.0,
                        xml(&fmt_ratio(q)),
                        xml(&fmt(v))
                    );
                }
                None => {
                    let why = find(r, sc, c).map_or("-", |x| x.status.as_str());
                    let _ = writeln!(
                        s,
                        r#"<text x="{:.1}" y="{:.1}" fill="{color}">{}</text>"#,
                        one + 4.0,
                        y + bar_h - 4.0,
                        xml(why)
                    );
                }
            }
        }
    }
    let ly = plot_bottom + 16.0;
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

/// A ratio as a label: "1690×", "9.9×", "1×", "0.75×", "1/640".
fn fmt_ratio(q: f64) -> String {
    let trim = |t: String| t.trim_end_matches('0').trim_end_matches('.').to_owned() + "×";
    if q >= 100.0 {
        format!("{q:.0}×")
    } else if q >= 10.0 {
        trim(format!("{q:.1}"))
    } else if q >= 0.5 {
        trim(format!("{q:.2}"))
    } else {
        format!("1/{:.0}", 1.0 / q)
    }
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

/// Goodput of each contender relative to plain TCP's, per scenario (interactive ones excluded).
pub fn throughput_chart(r: &RunReport) -> String {
    ratio_chart(
        r,
        "Goodput relative to plain TCP, per scenario",
        "log scale; right of 1× is faster than plain (labels: ratio · Mbit/s)",
        |x| x.rtt_p50_ms.is_none().then_some(x.goodput_mbps),
        |v| format!("{} Mbit/s", fmt_val(v)),
    )
}

/// WAN bytes of each contender relative to plain TCP's, per scenario.
pub fn wan_bytes_chart(r: &RunReport) -> String {
    ratio_chart(
        r,
        "Bytes on the emulated WAN relative to plain TCP, per scenario",
        "log scale; left of 1× is fewer bytes than plain (labels: ratio · MB, both directions, IP level)",
        |x| Some(x.wan_bytes as f64 / 1e6),
        |v| format!("{} MB", fmt_val(v)),
    )
}

/// Rewrites the two charts of a run from its JSON file (`<stem>.json` → `<stem>-throughput.svg`,
/// `<stem>-wan-bytes.svg` beside it), e.g. after a change of the charts.
pub fn rewrite_charts(json: &Path) -> Result<Vec<PathBuf>> {
    let text =
        std::fs::read_to_string(json).with_context(|| format!("reading {}", json.display()))?;
    let r: RunReport =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", json.display()))?;
    let stem = json
        .file_stem()
        .and_then(|s| s.to_str())
        .context("a run's JSON file name")?;
    let dir = json.parent().unwrap_or(Path::new("."));
    let mut out = Vec::new();
    for (suffix, svg) in [
        ("throughput", throughput_chart(&r)),
        ("wan-bytes", wan_bytes_chart(&r)),
    ] {
        let p = dir.join(format!("{stem}-{suffix}.svg"));
        std::fs::write(&p, svg).with_context(|| format!("writing {}", p.display()))?;
        out.push(p);
    }
    Ok(out)
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
        (format!("{stem}-throughput.svg"), throughput_chart(r)),
        (format!("{stem}-wan-bytes.svg"), wan_bytes_chart(r)),
    ];
    let mut out = Vec::new();
    for (name, text) in files {
        let p = dir.join(name);
        std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
        out.push(p);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratio_labels() {
        assert_eq!(fmt_ratio(1.0), "1×");
        assert_eq!(fmt_ratio(9.9), "9.9×");
        assert_eq!(fmt_ratio(92.06), "92.1×");
        assert_eq!(fmt_ratio(1690.4), "1690×");
        assert_eq!(fmt_ratio(0.75), "0.75×");
        assert_eq!(fmt_ratio(0.1), "1/10");
        assert_eq!(fmt_ratio(1.0 / 640.0), "1/640");
    }

    fn result(sc: &str, c: &str, mbps: f64, wan: u64) -> RunResult {
        RunResult {
            scenario: sc.into(),
            contender: c.into(),
            status: "ok".into(),
            goodput_mbps: mbps,
            wan_bytes: wan,
            ..RunResult::default()
        }
    }

    /// Bars are placed by their ratio to plain on a log axis: ×10 and ×100 are equally far apart
    /// whatever the scenario's absolute figures.
    #[test]
    fn bars_are_ratios_to_plain_on_a_log_axis() {
        let scenario = |name: &str| crate::scenarios::Scenario {
            name: name.into(),
            about: String::new(),
            rate: "10mbit".into(),
            rtt: "10ms".into(),
            loss: None,
            client_rcvbuf: None,
            workload: crate::scenarios::Workload::Rand { bytes: 1 },
            outage: None,
            restart: false,
            cross_peer: false,
        };
        let r = RunReport {
            date: "d".into(),
            started_unix: 0,
            machine: "m".into(),
            tools: vec![],
            scenarios: vec![scenario("slow"), scenario("fast")],
            results: vec![
                result("slow", "plain", 2.0, 1_000_000),
                result("slow", "ditto", 20.0, 100_000),
                result("fast", "plain", 3000.0, 1_000_000),
                result("fast", "ditto", 300_000.0, 1_000),
            ],
        };
        let svg = throughput_chart(&r);
        // Widths of the ditto bars (the second rect of each group after the background).
        let widths: Vec<f64> = svg
            .lines()
            .filter(|l| l.starts_with("<rect x=") && l.contains("fill=\"#2563eb\""))
            .filter_map(|l| l.split("width=\"").nth(1)?.split('"').next()?.parse().ok())
            .collect();
        assert_eq!(widths.len(), 3, "{svg}"); // two bars and the legend
        assert!((widths[1] - 2.0 * widths[0]).abs() < 0.5, "{widths:?}");
        assert!(svg.contains("10×") && svg.contains("100×"), "{svg}");
        let wan = wan_bytes_chart(&r);
        assert!(wan.contains("1/10") && wan.contains("1/1000"), "{wan}");
    }
}
