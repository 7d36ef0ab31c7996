//! The built-in dashboard (`/dashboard/`): a static page, its script and style, and the
//! vendored charting library (uPlot 1.6.32, MIT; `collector/assets/vendor/uplot/README.md`),
//! all embedded in the binary: nothing is fetched from elsewhere, and the page loads only
//! from this origin (its Content-Security-Policy says so).
//!
//! The files hold no data and need no token; the page asks the API for its data with the
//! caller's token (`X-Auth-Token`), so it shows what that token may see. docs/dashboard.md.

use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};

use super::error::ApiError;

/// (path under `/dashboard/`, content type, bytes).
const FILES: &[(&str, &str, &[u8])] = &[
    (
        "",
        "text/html; charset=utf-8",
        include_bytes!("../../assets/dashboard/index.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../assets/dashboard/app.js"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_bytes!("../../assets/dashboard/app.css"),
    ),
    (
        "vendor/uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../assets/vendor/uplot/uPlot.iife.min.js"),
    ),
    (
        "vendor/uPlot.min.css",
        "text/css; charset=utf-8",
        include_bytes!("../../assets/vendor/uplot/uPlot.min.css"),
    ),
    (
        "vendor/LICENSE",
        "text/plain; charset=utf-8",
        include_bytes!("../../assets/vendor/uplot/LICENSE"),
    ),
];

/// Scripts, styles and data from this origin only; no framing (clickjacking), no referrer
/// (the address may hold a resource id).
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// `GET /dashboard` → `/dashboard/` (the page's relative links need the slash).
pub(super) async fn redirect() -> Redirect {
    Redirect::permanent("/dashboard/")
}

/// `GET /dashboard/`.
pub(super) async fn index() -> Response {
    serve("")
}

/// `GET /dashboard/{*file}`.
pub(super) async fn file(Path(file): Path<String>) -> Response {
    serve(&file)
}

fn serve(path: &str) -> Response {
    let Some((_, kind, bytes)) = FILES.iter().find(|(p, _, _)| *p == path) else {
        return ApiError::NotFound(format!(
            "The resource could not be found: /dashboard/{path}"
        ))
        .into_response();
    };
    let mut res = (StatusCode::OK, *bytes).into_response();
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    // Small files, served from memory: always revalidate, so an upgrade shows at once.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_the_page_links_is_served_and_nothing_else() {
        let html = std::str::from_utf8(FILES[0].2).unwrap();
        for link in [
            "vendor/uPlot.min.css",
            "app.css",
            "vendor/uPlot.iife.min.js",
            "app.js",
            "vendor/LICENSE",
        ] {
            assert!(html.contains(&format!("\"{link}\"")), "{link} not linked");
            assert_eq!(serve(link).status(), StatusCode::OK, "{link}");
        }
        // No address outside this origin in what the page loads.
        for (path, _, bytes) in &FILES[..3] {
            let text = std::str::from_utf8(bytes).unwrap();
            assert!(
                !text.contains("http://") && !text.contains("https://"),
                "{path}"
            );
        }
        for bad in [
            "../Cargo.toml",
            "vendor",
            "app.js/",
            "%2e%2e/x",
            "index.html",
        ] {
            assert_eq!(serve(bad).status(), StatusCode::NOT_FOUND, "{bad}");
        }
    }
}
