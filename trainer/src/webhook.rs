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
        .ok_or_else(|| {
            format!(
                "export.webhook `{}`: must be an http:// or https:// URL",
                redact(url)
            )
        })?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(format!("export.webhook `{}`: no host", redact(url)));
    }
    Ok(())
}

/// `url` without credentials (`user:password@`), for messages and logs.
pub fn redact(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            match authority.rsplit_once('@') {
                Some((_, host)) => format!("{scheme}://***@{host}{path}"),
                None => url.to_string(),
            }
        }
        None => url.to_string(),
    }
}

/// POSTs `body` to `url`; returns the try that was accepted, or why none was. Redirects are
/// not followed (a redirected POST is not a delivered notice).
pub async fn notify(url: &str, body: &serde_json::Value) -> Result<u32, String> {
    check_url(url)?;
    let shown = redact(url);
    let client = reqwest::Client::builder()
        .timeout(PER_TRY)
        .redirect(reqwest::redirect::Policy::none())
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
                if s.is_redirection()
                    || (s.is_client_error() && s.as_u16() != 408 && s.as_u16() != 429)
                {
                    return Err(format!("{shown} refused the notice: {last}"));
                }
            }
            Err(e) => {
                let e = e.without_url();
                let mut why = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(c) = src {
                    why.push_str(&format!(": {c}"));
                    src = c.source();
                }
                last = why;
            }
        }
        let pause = Duration::from_millis(500 << (attempt - 1).min(4));
        if attempt == ATTEMPTS || started.elapsed() + pause >= DEADLINE {
            break;
        }
        tracing::warn!(url = %shown, attempt, error = %last, "webhook try failed; trying again");
        tokio::time::sleep(pause).await;
    }
    Err(format!(
        "{shown}: not delivered after {:.0} s: {last}",
        started.elapsed().as_secs_f64()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_never_reach_a_message() {
        assert_eq!(
            redact("https://alice:s3cret@hooks.example/x?y"),
            "https://***@hooks.example/x?y"
        );
        assert_eq!(redact("http://h:1/p@q"), "http://h:1/p@q");
        let e = check_url("ftp://alice:s3cret@h/").unwrap_err();
        assert!(!e.contains("s3cret"), "{e}");
    }
}
