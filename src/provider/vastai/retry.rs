//! Retry policy, modelled on the official client: retry 429, 502, 503, 504 and connection
//! errors with exponential backoff (0.15 s, ×1.5) plus jitter; honour a `Retry-After` of up to 60
//! seconds and give up at once on a longer one.

use std::time::Duration;

use backon::ExponentialBuilder;
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, RETRY_AFTER};

/// Longest `Retry-After` worth waiting for inside one call; longer waits go back to the caller
/// (the controller requeues) as the official client does.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// How hard to retry.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Total attempts per call, the first included (the official client's `--retry`, default 3).
    pub max_attempts: usize,
    pub min_delay: Duration,
    pub factor: f32,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 4,
            min_delay: Duration::from_millis(150),
            factor: 1.5,
            max_delay: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// The backoff schedule; jitter spreads out clients that failed together.
    pub fn backoff(&self) -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_min_delay(self.min_delay)
            .with_factor(self.factor)
            .with_max_delay(self.max_delay)
            .with_max_times(self.max_attempts.saturating_sub(1))
            .with_jitter()
    }
}

/// Statuses worth another attempt.
pub fn is_retryable_status(status: StatusCode) -> bool {
    matches!(status.as_u16(), 429 | 502 | 503 | 504)
}

/// A numeric `Retry-After` in seconds (the HTTP-date form is not used by this API).
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let secs = value.parse::<f64>().ok().filter(|s| s.is_finite() && *s >= 0.0)?;
    Some(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use reqwest::header::HeaderValue;

    use super::*;

    #[test]
    fn retry_after_is_read_in_seconds() {
        let mut headers = HeaderMap::new();
        assert_eq!(retry_after(&headers), None);
        headers.insert(RETRY_AFTER, HeaderValue::from_static("2"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(2)));
        headers.insert(RETRY_AFTER, HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"));
        assert_eq!(retry_after(&headers), None);
    }

    #[test]
    fn only_overload_statuses_are_retried() {
        for code in [429, 502, 503, 504] {
            assert!(is_retryable_status(StatusCode::from_u16(code).unwrap()), "{code}");
        }
        for code in [200, 400, 401, 403, 404, 410, 500] {
            assert!(!is_retryable_status(StatusCode::from_u16(code).unwrap()), "{code}");
        }
    }
}
