//! Rules that span apps: shared host ports, dependencies, cycles, secret
//! declarations, and the start order.

use std::collections::{BTreeMap, BTreeSet};

use super::{AppId, Manifest, ManifestError, Protocol, SecretKind};

/// Applies the cross-app rules to individually valid manifests. Returns the
/// apps that pass, in start order, and an error for each one that does not.
///
/// When two apps publish the same host port, the one whose id sorts first
/// keeps it and the other is refused: adding an app must never take down
/// one that was already fine.
pub(crate) fn check_set(mut apps: Vec<Manifest>) -> (Vec<Manifest>, Vec<ManifestError>) {
    apps.sort_by(|a, b| a.id.cmp(&b.id));
    let mut errors = Vec::new();
    let mut rejected: BTreeSet<AppId> = BTreeSet::new();

    let mut port_owner: BTreeMap<(u16, Protocol), &AppId> = BTreeMap::new();
    let mut secret_kind: BTreeMap<&str, (SecretKind, &AppId)> = BTreeMap::new();
    for app in &apps {
        for (i, port) in app.ports.iter().enumerate() {
            match port_owner.get(&(port.host, port.protocol)) {
                Some(owner) => {
                    errors.push(
                        ManifestError::new(
                            &app.path,
                            format!("ports[{i}].host"),
                            format!(
                                "host port {}/{} is used by both {owner} and {}",
                                port.host, port.protocol, app.id
                            ),
                        )
                        .with_value(port.host),
                    );
                    rejected.insert(app.id.clone());
                }
                None => {
                    port_owner.insert((port.host, port.protocol), &app.id);
                }
            }
        }
        for (i, s) in app.secrets.iter().enumerate() {
            match secret_kind.get(s.name.as_str()) {
                Some((kind, owner)) if *kind != s.kind => {
                    errors.push(
                        ManifestError::new(
                            &app.path,
                            format!("secrets[{i}].kind"),
                            format!("secret {} is declared as {kind:?} by {owner}; every app must declare a shared secret alike", s.name),
                        )
                        .with_value(format!("{:?}", s.kind).to_lowercase()),
                    );
                    rejected.insert(app.id.clone());
                }
                Some(_) => {}
                None => {
                    secret_kind.insert(&s.name, (s.kind, &app.id));
                }
            }
        }
    }

    // Dependencies: unknown ones and cycles. Rejection propagates: an app
    // whose dependency is refused cannot start either.
    let ids: BTreeSet<&AppId> = apps.iter().map(|a| &a.id).collect();
    for app in &apps {
        for (i, dep) in app.depends_on.iter().enumerate() {
            if !ids.contains(dep) {
                let known: Vec<&str> = ids.iter().map(|id| id.as_str()).collect();
                errors.push(
                    ManifestError::new(
                        &app.path,
                        format!("depends_on[{i}]"),
                        format!("names no valid app; valid apps: [{}]", known.join(", ")),
                    )
                    .with_value(dep),
                );
                rejected.insert(app.id.clone());
            }
        }
    }
    for cycle in find_cycles(&apps) {
        let names: Vec<&str> = cycle.iter().map(|id| id.as_str()).collect();
        let mut shown = names.clone();
        shown.push(names[0]);
        for id in &cycle {
            if let Some(app) = apps.iter().find(|a| &a.id == id) {
                errors.push(
                    ManifestError::new(
                        &app.path,
                        "depends_on",
                        format!("dependency cycle: {}", shown.join(" -> ")),
                    )
                    .with_value(format!(
                        "[{}]",
                        app.depends_on.iter().map(|d| d.as_str()).collect::<Vec<_>>().join(", ")
                    )),
                );
            }
            rejected.insert(id.clone());
        }
    }
    loop {
        let before = rejected.len();
        for app in &apps {
            if !rejected.contains(&app.id) {
                if let Some(dep) = app
                    .depends_on
                    .iter()
                    .find(|d| rejected.contains(*d) && ids.contains(*d))
                {
                    errors.push(
                        ManifestError::new(&app.path, "depends_on", format!("depends on {dep}, which is invalid"))
                            .with_value(dep),
                    );
                    rejected.insert(app.id.clone());
                }
            }
        }
        if rejected.len() == before {
            break;
        }
    }
    apps.retain(|a| !rejected.contains(&a.id));
    let ordered = start_order(&apps);
    (ordered, errors)
}

/// Orders apps so that every app comes after its dependencies; among apps
/// that are ready together, by id. Dependencies that are not in `apps` are
/// ignored: order only what exists (a missing app must never abort a start).
/// Apps caught in a cycle come last, in id order.
pub fn start_order(apps: &[Manifest]) -> Vec<Manifest> {
    let present: BTreeSet<&AppId> = apps.iter().map(|a| &a.id).collect();
    let mut done: BTreeSet<&AppId> = BTreeSet::new();
    let mut order = Vec::with_capacity(apps.len());
    let mut sorted: Vec<&Manifest> = apps.iter().collect();
    sorted.sort_by(|a, b| a.id.cmp(&b.id));
    while order.len() < sorted.len() {
        let ready: Vec<&Manifest> = sorted
            .iter()
            .filter(|a| !done.contains(&a.id))
            .filter(|a| a.depends_on.iter().all(|d| done.contains(d) || !present.contains(d)))
            .copied()
            .collect();
        if ready.is_empty() {
            order.extend(sorted.iter().filter(|a| !done.contains(&a.id)).map(|a| (*a).clone()));
            break;
        }
        for app in ready {
            done.insert(&app.id);
            order.push(app.clone());
        }
    }
    order
}

/// Every dependency cycle, each starting from its smallest id.
///
/// Prunes apps whose dependencies are all outside any cycle (Kahn), then
/// walks from what remains, always along a remaining dependency, until a
/// node repeats: that loop is a cycle. Linear in the size of the graph.
fn find_cycles(apps: &[Manifest]) -> Vec<Vec<AppId>> {
    let deps: BTreeMap<&AppId, &[AppId]> = apps.iter().map(|a| (&a.id, a.depends_on.as_slice())).collect();
    let mut remaining: BTreeSet<&AppId> = deps.keys().copied().collect();
    let mut cycles = Vec::new();
    loop {
        // Drop every app that no longer waits on a remaining app.
        loop {
            let free: Vec<&AppId> = remaining
                .iter()
                .filter(|id| !deps[*id].iter().any(|d| remaining.contains(d)))
                .copied()
                .collect();
            if free.is_empty() {
                break;
            }
            for id in free {
                remaining.remove(id);
            }
        }
        let Some(&start) = remaining.iter().next() else { break };
        let mut path: Vec<&AppId> = vec![start];
        let cycle = loop {
            let last = path[path.len() - 1];
            // Non-empty: every remaining app has a remaining dependency.
            let Some(next) = deps[last].iter().filter(|d| remaining.contains(*d)).min() else {
                break None;
            };
            if let Some(pos) = path.iter().position(|id| *id == next) {
                break Some(path.split_off(pos));
            }
            path.push(next);
        };
        let Some(mut cycle) = cycle else { break };
        let min = cycle
            .iter()
            .enumerate()
            .min_by(|a, b| a.1.cmp(b.1))
            .map_or(0, |(i, _)| i);
        cycle.rotate_left(min);
        for id in &cycle {
            remaining.remove(*id);
        }
        cycles.push(cycle.into_iter().cloned().collect());
    }
    cycles
}
