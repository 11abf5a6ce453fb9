//! Polling with a deadline: the way tests wait for something to happen,
//! instead of sleeping and hoping.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// How often [`wait_until`] re-checks its condition.
const POLL: Duration = Duration::from_millis(10);

/// Polls `cond` every few milliseconds until it is true or `deadline` passes.
/// Returns whether it became true; the last check happens at or after the
/// deadline, so a condition met just in time still counts.
pub async fn wait_until<F, Fut>(deadline: Instant, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep_until((Instant::now() + POLL).min(deadline)).await;
    }
}

/// [`wait_until`] with a timeout instead of a deadline, failing with
/// `what` in the error so a test says what it was waiting for.
pub async fn wait_for<F, Fut>(timeout: Duration, what: &str, cond: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    if wait_until(Instant::now() + timeout, cond).await {
        Ok(())
    } else {
        anyhow::bail!("timed out after {timeout:?} waiting for {what}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn returns_once_the_condition_holds() {
        let n = AtomicUsize::new(0);
        let ok = wait_until(Instant::now() + Duration::from_secs(5), || async {
            n.fetch_add(1, Ordering::Relaxed) >= 3
        })
        .await;
        assert!(ok);
        assert_eq!(n.load(Ordering::Relaxed), 4);
    }

    #[tokio::test]
    async fn gives_up_at_the_deadline() {
        let start = Instant::now();
        let ok = wait_until(start + Duration::from_millis(50), || async { false }).await;
        assert!(!ok);
        assert!(start.elapsed() >= Duration::from_millis(50));
        let err = wait_for(Duration::from_millis(20), "nothing", || async { false })
            .await
            .unwrap_err();
        assert!(err.to_string().contains("waiting for nothing"));
    }
}
