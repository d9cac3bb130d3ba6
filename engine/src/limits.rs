//! Time limits that tests shorten through the environment.

use std::time::Duration;

/// `default`, or the whole seconds in environment variable `var` when it is set and valid.
pub fn from_env(var: &str, default: Duration) -> Duration {
    std::env::var(var).ok().and_then(|v| v.parse().ok()).map_or(default, Duration::from_secs)
}
