//! The serving handoff: when an export is promoted, a JSON notice (model, version, URL,
//! metrics) is POSTed to `export.webhook`, retried with backoff within a bounded deadline.
//! A 2xx answer is delivery; a 4xx other than 408/429 is a refusal that retrying cannot fix;
//! anything else (5xx, 408, 429, no connection, a timeout) is tried again.

use std::time::{Duration, Instant};

/// Tries at most.
pub const ATTEMPTS: u32 = 6;
/// The longest one try may take.
pub const PER_TRY: Duration = Duration::from_secs(10);
/// The longest all tries together may take.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Checks that `url` is an http(s) URL a notice can go to.
pub fn check_url(url: &str) -> Result<(), String> {
    let lower = url.to_ascii_lowercase();
    let rest = lower
        .strip_prefix("http://")
        .or_else(|| lower.strip_prefix("https://"))
        .ok_or_else(|| format!("export.webhook `{url}`: must be an http:// or https:// URL"))?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(format!("export.webhook `{url}`: no host"));
    }
    Ok(())
}

/// POSTs `body` to `url`; returns the try that was accepted, or why none was.
pub async fn notify(url: &str, body: &serde_json::Value) -> Result<u32, String> {
    check_url(url)?;
    let client = reqwest::Client::builder()
        .timeout(PER_TRY)
        .build()
        .map_err(|e| format!("cannot make an HTTP client: {e}"))?;
    let payload = body.to_string();
    let started = Instant::now();
    let mut last = String::new();
    for attempt in 1..=ATTEMPTS {
        let sent = client
            .post(url)
            .header("content-type", "application/json")
            .body(payload.clone())
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => return Ok(attempt),
            Ok(r) => {
                let s = r.status();
                last = format!("HTTP {s}");
                if s.is_client_error() && s.as_u16() != 408 && s.as_u16() != 429 {
                    return Err(format!("{url} refused the notice: {last}"));
                }
            }
            Err(e) => last = e.to_string(),
        }
        let pause = Duration::from_millis(500 << (attempt - 1).min(4));
        if attempt == ATTEMPTS || started.elapsed() + pause >= DEADLINE {
            break;
        }
        tracing::warn!(url, attempt, error = %last, "webhook try failed; trying again");
        tokio::time::sleep(pause).await;
    }
    Err(format!(
        "{url}: not delivered after {:.0} s: {last}",
        started.elapsed().as_secs_f64()
    ))
}
