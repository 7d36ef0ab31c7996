//! Real headless Chromium (Debian's `chromium` package) loading a page: its DOM after the
//! page's scripts ran, and screenshots. One process per page load, no driver: Chromium's own
//! `--dump-dom` and `--screenshot`, with `--virtual-time-budget` so that the page's fetches
//! and timers run before the DOM is taken.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// The Chromium binary: `VMETER_CHROMIUM`, else `chromium` on the path.
pub fn chromium() -> String {
    std::env::var("VMETER_CHROMIUM").unwrap_or_else(|_| "chromium".into())
}

fn base(profile: &Path, budget: Duration) -> Command {
    let mut c = Command::new(chromium());
    c.args([
        "--headless",
        // As root (the test machines) Chromium refuses its sandbox.
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--no-first-run",
        "--disable-extensions",
        "--window-size=1400,1150",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .arg(format!("--virtual-time-budget={}", budget.as_millis()));
    c
}

/// The DOM of `url` once its scripts ran for `budget` of virtual time (fetches pause it).
pub fn dom(url: &str, profile: &Path, budget: Duration) -> String {
    let out = base(profile, budget)
        .arg("--dump-dom")
        .arg(url)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (apt-get install chromium)", chromium()));
    assert!(
        out.status.success(),
        "chromium --dump-dom {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A PNG of `url` after `budget` of virtual time, written to `png`.
pub fn screenshot(url: &str, profile: &Path, budget: Duration, png: &Path) {
    let out = base(profile, budget)
        .arg(format!("--screenshot={}", png.display()))
        .arg(url)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", chromium()));
    assert!(
        out.status.success() && png.exists(),
        "chromium --screenshot {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The value of attribute `name` of the first element carrying `marker` (an exact piece of
/// its start tag, such as `data-chart="cpu"`), HTML entities decoded.
pub fn attr(dom: &str, marker: &str, name: &str) -> Option<String> {
    let at = dom.find(marker)?;
    let tag_start = dom[..=at].rfind('<')?;
    let tag_end = at + dom[at..].find('>')?;
    let tag = &dom[tag_start..tag_end];
    let key = format!(" {name}=\"");
    let v = tag.find(&key)? + key.len();
    let end = v + tag[v..].find('"')?;
    Some(unescape(&tag[v..end]))
}

fn unescape(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

#[cfg(test)]
mod tests {
    #[test]
    fn attributes_are_found_and_decoded() {
        let dom = r#"<body data-state="drawn" data-draws="2"><section class="panel" data-chart="cpu" data-series="[{&quot;label&quot;:&quot;a&amp;b&quot;}]">"#;
        assert_eq!(super::attr(dom, "<body", "data-state").unwrap(), "drawn");
        assert_eq!(
            super::attr(dom, "data-chart=\"cpu\"", "data-series").unwrap(),
            r#"[{"label":"a&b"}]"#
        );
        assert_eq!(super::attr(dom, "data-chart=\"mem\"", "data-series"), None);
    }
}
