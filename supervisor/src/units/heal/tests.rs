use std::time::{Duration, Instant};

use pimesh_schema::{HealSettings, ManagedUnit, SupervisorConfig, UnitName};

use super::*;

fn settings() -> HealSettings {
    HealSettings::default()
}

fn proxy() -> ManagedUnit {
    SupervisorConfig::default().units.remove(0)
}

fn state(active: &str, sub: &str, result: &str, pid: u32) -> UnitState {
    UnitState {
        load_state: "loaded".into(),
        active_state: active.into(),
        sub_state: sub.into(),
        result: result.into(),
        main_pid: pid,
        n_restarts: 0,
        exec_main_status: 0,
    }
}

fn running(pid: u32) -> UnitState {
    state("active", "running", "success", pid)
}

#[test]
fn a_healthy_unit_is_left_alone() {
    let now = Instant::now();
    let mut healer = UnitHealer::new(&proxy());
    healer.observe_state(running(10));
    healer.observe_probe(now, true);
    assert_eq!(healer.decide(now, &settings(), 0), None);
    assert_eq!(
        healer.decide(now + Duration::from_secs(60), &settings(), 0),
        None
    );
    assert_eq!(healer.restarts_by_pimesh, 0);
}

#[test]
fn an_adopted_unit_that_has_not_answered_yet_is_not_restarted() {
    let now = Instant::now();
    let mut healer = UnitHealer::new(&proxy());
    healer.observe_state(running(10));
    assert_eq!(healer.decide(now, &settings(), 0), None);
    assert_eq!(healer.next_deadline(now, &settings()), None);
}

#[test]
fn a_failed_or_inactive_unit_is_started() {
    let now = Instant::now();
    let mut healer = UnitHealer::new(&proxy());
    healer.observe_state(state("failed", "failed", "signal", 0));
    let decision = healer.decide(now, &settings(), 0).expect("a decision");
    assert_eq!(decision.action, Action::Start { reset_failed: true });
    assert!(
        decision.reason.contains("Result=signal"),
        "{}",
        decision.reason
    );
    assert_eq!(healer.restarts_by_pimesh, 1);

    let mut healer = UnitHealer::new(&proxy());
    healer.observe_state(state("inactive", "dead", "success", 0));
    let decision = healer.decide(now, &settings(), 0).expect("a decision");
    assert_eq!(
        decision.action,
        Action::Start {
            reset_failed: false
        }
    );
    assert!(decision.reason.contains("inactive"));
}

#[test]
fn start_limit_hit_resets_the_failure_first() {
    let mut healer = UnitHealer::new(&proxy());
    healer.observe_state(state("failed", "failed", "start-limit-hit", 0));
    let decision = healer
        .decide(Instant::now(), &settings(), 0)
        .expect("a decision");
    assert_eq!(decision.action, Action::Start { reset_failed: true });
    assert_eq!(decision.action.name(), "reset-failed-and-start");
    assert!(
        decision.reason.contains("start limit hit"),
        "{}",
        decision.reason
    );
}

#[test]
fn systemd_at_work_is_waited_for() {
    let now = Instant::now();
    let mut healer = UnitHealer::new(&proxy());
    for (active, sub) in [
        ("activating", "auto-restart"),
        ("activating", "start"),
        ("deactivating", "stop-sigterm"),
        ("reloading", "reload"),
    ] {
        healer.observe_state(state(active, sub, "signal", 0));
        assert_eq!(healer.decide(now, &settings(), 0), None, "{active}/{sub}");
    }
}

#[test]
fn a_hung_unit_is_restarted_after_the_threshold_only() {
    let t0 = Instant::now();
    let s = settings();
    let mut healer = UnitHealer::new(&proxy());
    healer.observe_state(running(10));
    healer.observe_probe(t0, true);
    healer.observe_probe(t0 + Duration::from_secs(1), false);
    assert_eq!(healer.decide(t0 + Duration::from_secs(1), &s, 0), None);
    assert_eq!(
        healer.next_deadline(t0 + Duration::from_secs(1), &s),
        Some(t0 + Duration::from_secs(4))
    );
    healer.observe_probe(t0 + Duration::from_secs(3), false);
    assert_eq!(healer.decide(t0 + Duration::from_millis(3999), &s, 0), None);
    let decision = healer
        .decide(t0 + Duration::from_secs(4), &s, 0)
        .expect("restart");
    assert_eq!(decision.action, Action::Restart);
    assert!(decision.reason.contains("hung"), "{}", decision.reason);
}

#[test]
fn one_good_probe_clears_the_hang_clock() {
    let t0 = Instant::now();
    let mut healer = UnitHealer::new(&proxy());
    healer.observe_state(running(10));
    healer.observe_probe(t0, false);
    healer.observe_probe(t0 + Duration::from_secs(2), true);
    healer.observe_probe(t0 + Duration::from_secs(3), false);
    assert_eq!(
        healer.decide(t0 + Duration::from_secs(5), &settings(), 0),
        None
    );
}

#[test]
fn a_new_main_process_forgets_old_probe_answers() {
    let t0 = Instant::now();
    let mut healer = UnitHealer::new(&proxy());
    healer.observe_state(running(10));
    healer.observe_probe(t0, false);
    healer.observe_state(running(11));
    assert_eq!(healer.ready, None);
    assert_eq!(
        healer.decide(t0 + Duration::from_secs(10), &settings(), 0),
        None
    );
}

#[test]
fn probes_of_an_inactive_unit_are_ignored() {
    let t0 = Instant::now();
    let mut healer = UnitHealer::new(&proxy());
    healer.observe_state(state("activating", "start", "success", 5));
    healer.observe_probe(t0, false);
    assert_eq!(healer.ready, None);
}

/// Drives a unit that fails at once every time: returns the instants of each action.
fn failing_forever(settings: &HealSettings, window: Duration) -> Vec<(Instant, Decision)> {
    let t0 = Instant::now();
    let mut healer = UnitHealer::new(&proxy());
    let mut actions = Vec::new();
    let mut now = t0;
    let mut random = 1u64;
    while now < t0 + window {
        healer.observe_state(state("failed", "failed", "exit-code", 0));
        random = random.wrapping_mul(6364136223846793005).wrapping_add(1);
        if let Some(decision) = healer.decide(now, settings, random) {
            healer.observe_job_finished();
            actions.push((now, decision));
        }
        // The caller wakes at the next deadline or at the next probe tick.
        now = healer
            .next_deadline(now, settings)
            .unwrap_or(now + settings.probe_interval)
            .min(now + settings.probe_interval);
    }
    actions
}

#[test]
fn a_unit_failing_forever_backs_off_and_never_hot_loops() {
    let s = settings();
    let actions = failing_forever(&s, Duration::from_secs(600));
    // 0.2 + 0.4 + ... doubles to 30 s: about 8 attempts in the first minute, then one
    // every 22.5..30 s.
    assert!(
        actions.len() < 35,
        "{} actions in 10 minutes",
        actions.len()
    );
    for pair in actions.windows(2) {
        let gap = pair[1].0 - pair[0].0;
        assert!(gap >= s.backoff_initial * 3 / 4, "gap {gap:?}");
    }
    let last_gaps: Vec<_> = actions
        .windows(2)
        .rev()
        .take(5)
        .map(|p| p[1].0 - p[0].0)
        .collect();
    for gap in last_gaps {
        assert!(gap >= s.backoff_max * 3 / 4 && gap <= s.backoff_max + s.probe_interval);
    }
}

#[test]
fn escalation_climbs_the_ladder_once_per_episode() {
    let mut s = settings();
    s.escalate_after = 2;
    let actions = failing_forever(&s, Duration::from_secs(600));
    let reasons: Vec<_> = actions.iter().map(|(_, d)| d.reason.clone()).collect();
    // attempt 3: the dependency rung (none configured), attempt 5: reboot refused.
    assert!(
        reasons[2].contains("no dependencies configured"),
        "{reasons:?}"
    );
    assert!(reasons[4].contains("allow_reboot is false"), "{reasons:?}");
    assert!(actions.iter().all(|(_, d)| d.action != Action::Reboot));
    assert_eq!(
        reasons
            .iter()
            .filter(|r| r.contains("allow_reboot"))
            .count(),
        1
    );
}

#[test]
fn escalation_restarts_dependencies_then_reboots_when_allowed() {
    let t0 = Instant::now();
    let mut s = settings();
    s.escalate_after = 1;
    s.allow_reboot = true;
    let mut unit = proxy();
    unit.dependencies = vec![SupervisorConfig::default().units[1].name.clone()];
    let mut healer = UnitHealer::new(&unit);
    let mut actions = Vec::new();
    let mut now = t0;
    while actions.len() < 3 {
        healer.observe_state(state("failed", "failed", "exit-code", 0));
        if let Some(decision) = healer.decide(now, &s, 0) {
            healer.observe_job_finished();
            actions.push(decision.action);
        }
        now += Duration::from_secs(1);
    }
    assert_eq!(actions[0], Action::Start { reset_failed: true });
    assert_eq!(
        actions[1],
        Action::RestartDependencies(unit.dependencies.clone())
    );
    assert_eq!(actions[2], Action::Reboot);
    assert_eq!(healer.escalation, Escalation::Reboot);
}

#[test]
fn a_stable_unit_ends_the_failure_episode() {
    let t0 = Instant::now();
    let s = settings();
    let mut healer = UnitHealer::new(&proxy());
    healer.observe_state(state("failed", "failed", "exit-code", 0));
    assert!(healer.decide(t0, &s, 0).is_some());
    healer.observe_job_finished();
    healer.observe_state(running(20));
    healer.observe_probe(t0 + Duration::from_secs(1), true);
    assert_eq!(healer.decide(t0 + Duration::from_secs(1), &s, 0), None);
    assert_eq!(healer.attempts, 1);
    assert_eq!(
        healer.next_deadline(t0 + Duration::from_secs(1), &s),
        Some(t0 + Duration::from_secs(1) + STABLE_AFTER)
    );
    assert_eq!(healer.decide(t0 + Duration::from_secs(11), &s, 0), None);
    assert_eq!(healer.attempts, 0);
    assert_eq!(healer.escalation, Escalation::None);
}

#[test]
fn no_second_action_while_the_first_job_runs() {
    let t0 = Instant::now();
    let s = settings();
    let mut healer = UnitHealer::new(&proxy());
    healer.observe_state(state("failed", "failed", "exit-code", 0));
    assert!(healer.decide(t0, &s, 0).is_some());
    assert_eq!(healer.decide(t0 + Duration::from_secs(5), &s, 0), None);
    healer.observe_job_finished();
    assert!(healer.decide(t0 + Duration::from_secs(5), &s, 0).is_some());
}

#[test]
fn missing_units_are_reported_not_acted_on() {
    let mut healer = UnitHealer::new(&proxy());
    let mut missing = state("inactive", "dead", "success", 0);
    missing.load_state = "not-found".into();
    assert!(unmanageable(&missing).is_some_and(|e| e.contains("no such unit")));
    healer.observe_state(missing);
    assert_eq!(healer.decide(Instant::now(), &settings(), 0), None);
}

#[test]
fn escalation_rungs_are_named_as_the_status_shows_them() {
    let names = [
        Escalation::None,
        Escalation::Dependencies,
        Escalation::RebootRefused,
        Escalation::Reboot,
    ]
    .map(Escalation::name);
    assert_eq!(names, ["none", "dependencies", "reboot-refused", "reboot"]);
}

fn k3s_server() -> ManagedUnit {
    ManagedUnit {
        name: UnitName::try_from("k3s.service".to_owned()).expect("name"),
        ready_url: proxy().ready_url,
        dependencies: Vec::new(),
    }
}

#[test]
fn a_hung_k3s_server_is_not_restarted_while_quorum_says_hold() {
    let settings = settings();
    let now = Instant::now();
    let mut healer = UnitHealer::new(&k3s_server());
    healer.observe_state(running(10));
    healer.observe_probe(now, false);
    // Unready within its startup grace, K3s is not hung.
    let within = now + settings.hang_threshold + Duration::from_secs(1);
    healer.observe_probe(within, false);
    assert_eq!(healer.decide_held(within, &settings, 0, None), None);
    let later = now + K3S_STARTUP_GRACE + settings.hang_threshold + Duration::from_secs(1);
    healer.observe_probe(later, false);
    assert!(
        !healer.wants_disruption(within, &settings),
        "within the grace"
    );
    assert!(
        healer.wants_disruption(later, &settings),
        "a restart takes a member"
    );
    let hold = "1 of 3 servers ready without this one; etcd needs 2";
    assert_eq!(healer.decide_held(later, &settings, 0, Some(hold)), None);
    assert_eq!(healer.attempts, 0, "a held-back heal counts no attempt");
    assert!(healer
        .held_back
        .as_deref()
        .is_some_and(|why| why.contains(hold)));
    // The hold lifts: K3s has its startup grace again to find its quorum.
    healer.observe_probe(later, false);
    let soon = later + settings.hang_threshold + Duration::from_secs(1);
    assert_eq!(healer.decide_held(soon, &settings, 0, None), None);
    assert!(
        healer.held_back.is_some(),
        "still said until healthy or healed"
    );
    // Still unready after the grace: the restart goes ahead.
    let after = later + K3S_STARTUP_GRACE + settings.hang_threshold + Duration::from_secs(1);
    healer.observe_probe(after, false);
    let decision = healer
        .decide_held(after, &settings, 0, None)
        .expect("a decision");
    assert_eq!(decision.action, Action::Restart);
    assert_eq!(healer.held_back, None);
    // A K3s server that is down is started even while held: starting takes no member away.
    let mut down = UnitHealer::new(&k3s_server());
    down.observe_state(state("failed", "failed", "exit-code", 0));
    assert!(
        !down.wants_disruption(now, &settings),
        "starting takes no member away"
    );
    let decision = down
        .decide_held(now, &settings, 0, Some(hold))
        .expect("a decision");
    assert_eq!(decision.action, Action::Start { reset_failed: true });
}

#[test]
fn no_unit_escalates_to_a_reboot_while_quorum_says_hold() {
    let settings = HealSettings {
        allow_reboot: true,
        ..settings()
    };
    let mut healer = UnitHealer::new(&proxy());
    let mut now = Instant::now();
    let mut reboots = 0;
    for _ in 0..(settings.escalate_after * 3 + 2) {
        healer.observe_state(state("failed", "failed", "exit-code", 0));
        if let Some(decision) = healer.decide_held(now, &settings, 0, Some("quorum")) {
            if decision.action == Action::Reboot {
                reboots += 1;
            }
            healer.observe_job_finished();
        }
        now += settings.backoff_max + Duration::from_secs(1);
    }
    assert_eq!(reboots, 0);
    assert!(healer
        .held_back
        .as_deref()
        .is_some_and(|why| why.contains("reboot is due but held back")));
    // Released, the ladder goes on to the reboot.
    healer.observe_state(state("failed", "failed", "exit-code", 0));
    let decision = healer
        .decide_held(now, &settings, 0, None)
        .expect("a decision");
    assert_eq!(decision.action, Action::Reboot);
}
