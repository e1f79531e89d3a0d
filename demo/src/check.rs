//! `pimesh-demo page-check`: opens the demo's page in headless Chromium and reports, one
//! JSON line per phase, what a visitor would see: the vehicles arrive, they move (and
//! which way each relay carries the live feed), the staff split's error share once enough
//! calls are made, and, when asked, how long until a fault on a service shows on the mesh
//! panel. Every wait has a deadline; a missed one is an error naming what was awaited.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};

use crate::browser::{Browser, Page};

const POLL: Duration = Duration::from_millis(250);

/// What to check.
#[derive(Clone, Debug)]
pub struct Options {
    /// The page, as `http://host:8080/` (with `?staff_hz=` to change the call rate).
    pub url: String,
    /// Where the screenshots (and Chromium's log) go.
    pub screenshots: PathBuf,
    /// Staff calls counted before the error share is reported.
    pub staff_calls: u64,
    /// A service whose fault to wait for on the mesh panel, after `waiting-fault`.
    pub fault_on: Option<String>,
    /// The deadline of each phase.
    pub timeout: Duration,
}

/// The page's element id for a service name (as the page's `safeId` makes it).
fn safe_id(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Polls `check` until it gives `Some`, or fails at the deadline naming `what`, with a
/// screenshot (`failed.png`) and the page's text.
async fn wait<T>(
    page: &mut Page,
    options: &Options,
    what: &str,
    mut check: impl for<'a> FnMut(
        &'a mut Page,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Option<T>, String>> + 'a>,
    >,
) -> Result<T, String> {
    let started = tokio::time::Instant::now();
    loop {
        if let Some(found) = check(page).await? {
            return Ok(found);
        }
        if started.elapsed() > options.timeout {
            let text = page.text().await;
            let shot = options.screenshots.join("failed.png");
            let _ = page.screenshot(&shot).await;
            return Err(format!(
                "waited {:?} for {what}, in vain (screenshot {})\npage:\n{text}",
                options.timeout,
                shot.display()
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The sum of the `data-value`s of the page's fault entries for `service`.
fn fault_count(service: &str) -> String {
    format!(
        "Array.from(document.querySelectorAll('[id^=\"fault-{}-\"]'))\
         .reduce((sum, e) => sum + (Number(e.getAttribute('data-value')) || 0), 0)",
        safe_id(service)
    )
}

const POSITION: &str = "(() => { const v = document.querySelector('[data-vehicle]'); \
    return v ? v.getAttribute('data-vehicle') + '@' + v.getAttribute('data-lat') + ',' + v.getAttribute('data-lon') : null; })()";
const FEED_MESSAGES: &str = "Number(document.getElementById('feed-messages').textContent) || 0";

/// Runs the check, handing each phase's JSON to `report` as it is reached.
///
/// # Errors
/// When Chromium cannot be driven or a phase's deadline passes; the message names what
/// was awaited.
pub async fn run(options: &Options, mut report: impl FnMut(Value)) -> Result<(), String> {
    std::fs::create_dir_all(&options.screenshots)
        .map_err(|err| format!("{}: {err}", options.screenshots.display()))?;
    let browser =
        Browser::launch(&options.screenshots.join("chromium.log"), options.timeout).await?;
    let mut page = browser.page().await?;
    page.call("Page.enable", json!({})).await?;
    page.call("Page.navigate", json!({ "url": options.url }))
        .await?;

    wait(&mut page, options, "the page to load", |page| {
        Box::pin(async move {
            let title = page.eval("document.title").await?;
            Ok((title == "Fleetman on Pimesh").then_some(()))
        })
    })
    .await?;
    let vehicles = wait(&mut page, options, "eight vehicles on the map", |page| {
        Box::pin(async move {
            let count = page
                .eval("document.querySelectorAll('[data-vehicle]').length")
                .await?
                .as_u64()
                .unwrap_or(0);
            Ok((count >= 8).then_some(count))
        })
    })
    .await?;
    report(json!({ "phase": "loaded", "vehicles": vehicles }));

    // A vehicle moves as feed messages arrive, and both relays said how they carry it.
    let first = page.eval(POSITION).await?;
    let messages = page.eval(FEED_MESSAGES).await?.as_f64().unwrap_or(0.0);
    wait(&mut page, options, "a vehicle moving on the map", |page| {
        let first = first.clone();
        Box::pin(async move {
            let now = page.eval(POSITION).await?;
            Ok((now.is_string() && now != first).then_some(()))
        })
    })
    .await?;
    wait(
        &mut page,
        options,
        "the live feed carrying messages",
        |page| {
            Box::pin(async move {
                let now = page.eval(FEED_MESSAGES).await?.as_f64().unwrap_or(0.0);
                Ok((now >= messages + 3.0).then_some(()))
            })
        },
    )
    .await?;
    let feed = wait(&mut page, options, "both feed hops reported", |page| {
        Box::pin(async move {
            let hops = page.text_of("feed-mode").await?.unwrap_or_default();
            Ok((hops.matches(": ").count() >= 2).then_some(hops))
        })
    })
    .await?;
    report(json!({ "phase": "moving", "feed": feed }));

    // The staff panel, once enough calls went through the split.
    let wanted = options.staff_calls as f64;
    let calls = wait(
        &mut page,
        options,
        &format!("{} staff calls", options.staff_calls),
        |page| {
            Box::pin(async move {
                Ok(page
                    .value("staff-calls")
                    .await?
                    .filter(|calls| *calls >= wanted))
            })
        },
    )
    .await?;
    // Read together: the counters move on between reads.
    let counts = page
        .eval(
            "['staff-ok', 'staff-errors'].map((id) => Number(document.getElementById(id).getAttribute('data-value')) || 0)",
        )
        .await?;
    let ok = counts[0].as_f64().unwrap_or(0.0);
    let errors = counts[1].as_f64().unwrap_or(0.0);
    let total = (ok + errors).max(calls);
    let share = if total > 0.0 { errors / total } else { 0.0 };
    report(json!({
        "phase": "staff",
        "calls": total as u64,
        "errors": errors as u64,
        "share": (share * 10_000.0).round() / 10_000.0,
    }));
    page.screenshot(&options.screenshots.join("fleetman.png"))
        .await?;

    if let Some(service) = &options.fault_on {
        let success_id = format!("mesh-{}-success", safe_id(service));
        let faults = fault_count(service);
        let before = page.eval(&faults).await?.as_f64().unwrap_or(0.0);
        report(json!({ "phase": "waiting-fault" }));
        let started = tokio::time::Instant::now();
        wait(
            &mut page,
            options,
            &format!(
                "{service}'s success rate below 95 % (or its faults rising) on the mesh panel"
            ),
            |page| {
                let success_id = success_id.clone();
                let faults = faults.clone();
                Box::pin(async move {
                    let rate = page.value(&success_id).await?;
                    let count = page.eval(&faults).await?.as_f64().unwrap_or(0.0);
                    Ok((rate.is_some_and(|rate| rate < 0.95) || count > before).then_some(()))
                })
            },
        )
        .await?;
        let seconds = started.elapsed().as_secs_f64();
        report(json!({ "phase": "fault", "seconds": (seconds * 10.0).round() / 10.0 }));
        page.screenshot(&options.screenshots.join("fleetman-fault.png"))
            .await?;
    }
    drop(browser);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_ids_match_the_page() {
        assert_eq!(
            safe_id("fleetman-position-tracker"),
            "fleetman-position-tracker"
        );
        assert_eq!(safe_id("a.b c"), "a_b_c");
    }
}
