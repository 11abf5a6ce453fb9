//! The retry schedule, including the repeat of its last step.

use std::time::Duration;

use skein_delivery::RetryPolicy;

#[test]
fn schedule_steps_then_repeats_the_last() {
    let s = Duration::from_secs;
    let policy = RetryPolicy::new(vec![s(60), s(300), s(3600)]);
    let table = [
        (0, s(60)),
        (1, s(300)),
        (2, s(3600)),
        (3, s(3600)),
        (50, s(3600)),
        (u32::MAX, s(3600)),
    ];
    for (attempts, want) in table {
        assert_eq!(
            policy.delay_for(attempts),
            want,
            "after {attempts} attempts"
        );
    }
}

#[test]
fn empty_schedule_means_the_default() {
    let policy = RetryPolicy::new(Vec::new());
    assert_eq!(policy, RetryPolicy::default());
    assert_eq!(policy.delay_for(0), Duration::from_secs(300));
    assert_eq!(policy.delay_for(1), Duration::from_secs(600));
    assert_eq!(policy.delay_for(1000), Duration::from_secs(4 * 3600));
}

#[test]
fn single_step_repeats() {
    let policy = RetryPolicy::new(vec![Duration::from_secs(7)]);
    for n in 0..5 {
        assert_eq!(policy.delay_for(n), Duration::from_secs(7));
    }
}

#[test]
fn jitter_stays_within_ten_percent_and_spreads() {
    let p = RetryPolicy::new(vec![Duration::from_secs(100)]);
    let mut rng = rand::rng();
    let delays: Vec<Duration> = (0..200).map(|_| p.jittered(0, &mut rng)).collect();
    for d in &delays {
        assert!(
            (Duration::from_secs(90)..=Duration::from_secs(110)).contains(d),
            "{d:?}"
        );
    }
    let distinct: std::collections::HashSet<_> = delays.iter().collect();
    assert!(
        distinct.len() > 50,
        "jitter spreads retries: {} distinct",
        distinct.len()
    );
}
