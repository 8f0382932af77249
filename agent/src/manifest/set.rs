//! Rules that span apps: shared host ports, dependencies, cycles, secret
//! declarations, and the start order.

use std::collections::{BTreeMap, BTreeSet};

use super::{AppId, Manifest, ManifestError, Naming, Protocol, SecretKind};

/// Applies the cross-app rules to individually valid manifests. Returns the
/// apps that pass, in start order, and an error for each one that does not.
///
/// Dependency problems are checked first, so that a refused app holds no
/// port, container name or secret kind that could get a valid app refused.
/// When two apps then claim the same host port or container name, the one
/// whose id sorts first keeps it and the other is refused.
pub(crate) fn check_set(mut apps: Vec<Manifest>) -> (Vec<Manifest>, Vec<ManifestError>) {
    apps.sort_by(|a, b| a.id.cmp(&b.id));
    let mut errors = Vec::new();
    let mut rejected: BTreeSet<AppId> = BTreeSet::new();

    // Dependencies: unknown ones and cycles.
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

    // Claims on shared resources, among the apps still standing.
    let naming = Naming::Prod;
    let mut port_owner: BTreeMap<(u16, Protocol), &AppId> = BTreeMap::new();
    let mut name_owner: BTreeMap<String, &AppId> = BTreeMap::new();
    let mut secret_kind: BTreeMap<&str, (SecretKind, &AppId)> = BTreeMap::new();
    let standing: Vec<&Manifest> = apps.iter().filter(|a| !rejected.contains(&a.id)).collect();
    for app in standing {
        let mut refuse = |e: ManifestError| {
            errors.push(e);
            rejected.insert(app.id.clone());
        };
        let name = naming.container_name(app);
        match name_owner.get(&name) {
            Some(owner) => refuse(
                ManifestError::new(
                    &app.path,
                    "container_name",
                    format!("container name {name} is used by both {owner} and {}", app.id),
                )
                .with_value(&name),
            ),
            None => {
                name_owner.insert(name, &app.id);
            }
        }
        for (i, port) in app.ports.iter().enumerate() {
            match port_owner.get(&(port.host, port.protocol)) {
                Some(owner) => refuse(
                    ManifestError::new(
                        &app.path,
                        format!("ports[{i}].host"),
                        format!(
                            "host port {}/{} is used by both {owner} and {}",
                            port.host, port.protocol, app.id
                        ),
                    )
                    .with_value(port.host),
                ),
                None => {
                    port_owner.insert((port.host, port.protocol), &app.id);
                }
            }
        }
        for (i, s) in app.secrets.iter().enumerate() {
            match secret_kind.get(s.name.as_str()) {
                Some((kind, owner)) if *kind != s.kind => refuse(
                    ManifestError::new(
                        &app.path,
                        format!("secrets[{i}].kind"),
                        format!(
                            "secret {} is declared as {kind} by {owner}; every app must declare a shared secret alike",
                            s.name
                        ),
                    )
                    .with_value(s.kind),
                ),
                Some(_) => {}
                None => {
                    secret_kind.insert(&s.name, (s.kind, &app.id));
                }
            }
        }
    }

    // Rejection propagates: an app whose dependency is refused cannot start.
    loop {
        let before = rejected.len();
        for app in &apps {
            if rejected.contains(&app.id) {
                continue;
            }
            let bad = app
                .depends_on
                .iter()
                .enumerate()
                .find(|(_, d)| rejected.contains(*d) && ids.contains(*d));
            if let Some((i, dep)) = bad {
                errors.push(
                    ManifestError::new(
                        &app.path,
                        format!("depends_on[{i}]"),
                        format!("depends on {dep}, which is invalid"),
                    )
                    .with_value(dep),
                );
                rejected.insert(app.id.clone());
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::path::PathBuf;

    use super::super::{AppKind, PortMapping, SecretSpec};
    use super::*;
    use crate::manifest::test_app as app;

    fn with_port(mut m: Manifest, host: u16, protocol: Protocol) -> Manifest {
        m.ports.push(PortMapping {
            host,
            container: 80,
            protocol,
        });
        m
    }

    fn with_secret(mut m: Manifest, name: &str, kind: SecretKind) -> Manifest {
        m.secrets.push(SecretSpec {
            name: name.to_owned(),
            kind,
        });
        m
    }

    fn ids(apps: &[Manifest]) -> Vec<&str> {
        apps.iter().map(|a| a.id.as_str()).collect()
    }

    fn errors_of<'a>(errors: &'a [ManifestError], app: &str) -> Vec<&'a ManifestError> {
        let file = PathBuf::from(format!("/apps/{app}/manifest.yml"));
        errors.iter().filter(|e| e.file == file).collect()
    }

    #[test]
    fn container_name_claimed_twice_is_an_error_naming_both_and_the_first_id_keeps_it() {
        let mut ui = app("web", &[]);
        ui.kind = AppKind::Ui;
        let mut svc = app("web-svc", &[]);
        svc.container_name = Some("archy-web".to_owned());
        let (apps, errors) = check_set(vec![svc, ui]);
        assert_eq!(ids(&apps), ["web"]);
        let errs = errors_of(&errors, "web-svc");
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert_eq!(errs[0].field, "container_name");
        assert_eq!(errs[0].value.as_deref(), Some("archy-web"));
        assert!(errs[0].problem.contains("used by both web and web-svc"), "{}", errs[0]);
    }

    #[test]
    fn apps_refused_for_their_dependencies_hold_no_ports() {
        let mut broken = app("a-broken", &["missing"]);
        broken.ports = vec![PortMapping {
            host: 8080,
            container: 80,
            protocol: Protocol::Tcp,
        }];
        let mut fine = app("b-fine", &[]);
        fine.ports = broken.ports.clone();
        let (apps, errors) = check_set(vec![broken, fine]);
        assert_eq!(ids(&apps), ["b-fine"]);
        assert!(errors_of(&errors, "b-fine").is_empty(), "{errors:#?}");
    }

    #[test]
    fn start_order_puts_dependencies_first_and_otherwise_sorts_by_id() {
        let apps = [app("b", &["c"]), app("d", &[]), app("c", &["a"]), app("a", &[])];
        assert_eq!(ids(&start_order(&apps)), ["a", "d", "c", "b"]);
    }

    #[test]
    fn start_order_ignores_dependencies_that_are_not_present() {
        let apps = [app("a", &["b"]), app("b", &["not-installed"])];
        assert_eq!(ids(&start_order(&apps)), ["b", "a"]);
    }

    #[test]
    fn start_order_puts_apps_caught_in_a_cycle_last() {
        let apps = [app("a", &["b"]), app("b", &["a"]), app("c", &[])];
        assert_eq!(ids(&start_order(&apps)), ["c", "a", "b"]);
    }

    #[test]
    fn check_set_returns_valid_apps_in_start_order() {
        let (apps, errors) = check_set(vec![app("web", &["api"]), app("api", &["db"]), app("db", &[])]);
        assert!(errors.is_empty(), "{errors:#?}");
        assert_eq!(ids(&apps), ["db", "api", "web"]);
    }

    #[test]
    fn dependency_cycle_is_an_error_naming_the_cycle_on_every_member() {
        let (apps, errors) = check_set(vec![
            app("b", &["c"]),
            app("a", &["b"]),
            app("c", &["a"]),
            app("free", &[]),
        ]);
        assert_eq!(ids(&apps), ["free"]);
        for member in ["a", "b", "c"] {
            let errs = errors_of(&errors, member);
            assert_eq!(errs.len(), 1, "{errs:#?}");
            assert_eq!(errs[0].field, "depends_on");
            assert!(
                errs[0].problem.contains("dependency cycle: a -> b -> c -> a"),
                "{}",
                errs[0]
            );
        }
        assert_eq!(errors_of(&errors, "a")[0].value.as_deref(), Some("[b]"));
    }

    #[test]
    fn self_dependency_is_a_cycle() {
        let (apps, errors) = check_set(vec![app("loop", &["loop"])]);
        assert!(apps.is_empty());
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].problem.contains("dependency cycle: loop -> loop"),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn separate_cycles_are_each_reported() {
        let (apps, errors) = check_set(vec![
            app("a", &["b"]),
            app("b", &["a"]),
            app("x", &["y"]),
            app("y", &["x"]),
        ]);
        assert!(apps.is_empty());
        let messages: Vec<&str> = errors.iter().map(|e| e.problem.as_str()).collect();
        assert!(messages.contains(&"dependency cycle: a -> b -> a"), "{messages:?}");
        assert!(messages.contains(&"dependency cycle: x -> y -> x"), "{messages:?}");
    }

    #[test]
    fn app_depending_on_a_cycle_is_refused() {
        let (apps, errors) = check_set(vec![app("a", &["b"]), app("b", &["a"]), app("user", &["a"])]);
        assert!(apps.is_empty());
        let errs = errors_of(&errors, "user");
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert_eq!(errs[0].field, "depends_on[0]");
        assert_eq!(errs[0].value.as_deref(), Some("a"));
        assert!(
            errs[0].problem.contains("depends on a, which is invalid"),
            "{}",
            errs[0]
        );
    }

    #[test]
    fn host_port_conflict_names_both_apps_and_the_first_id_keeps_the_port() {
        let (apps, errors) = check_set(vec![
            with_port(app("beta", &[]), 8080, Protocol::Tcp),
            with_port(with_port(app("alpha", &[]), 9000, Protocol::Tcp), 8080, Protocol::Tcp),
        ]);
        assert_eq!(ids(&apps), ["alpha"]);
        assert_eq!(errors.len(), 1, "{errors:#?}");
        let e = &errors[0];
        assert_eq!(e.file, PathBuf::from("/apps/beta/manifest.yml"));
        assert_eq!(e.field, "ports[0].host");
        assert_eq!(e.value.as_deref(), Some("8080"));
        assert!(
            e.problem.contains("host port 8080/tcp is used by both alpha and beta"),
            "{e}"
        );
    }

    #[test]
    fn same_host_port_on_tcp_and_udp_is_not_a_conflict() {
        let (apps, errors) = check_set(vec![
            with_port(app("dns", &[]), 53, Protocol::Udp),
            with_port(app("web", &[]), 53, Protocol::Tcp),
        ]);
        assert!(errors.is_empty(), "{errors:#?}");
        assert_eq!(apps.len(), 2);
    }

    #[test]
    fn dependency_on_an_unknown_app_is_refused_listing_the_valid_apps() {
        let (apps, errors) = check_set(vec![app("db", &[]), app("web", &["db", "cache"])]);
        assert_eq!(ids(&apps), ["db"]);
        assert_eq!(errors.len(), 1, "{errors:#?}");
        let e = &errors[0];
        assert_eq!(e.field, "depends_on[1]");
        assert_eq!(e.value.as_deref(), Some("cache"));
        assert!(e.problem.contains("names no valid app; valid apps: [db, web]"), "{e}");
    }

    #[test]
    fn app_depending_on_a_refused_app_is_refused_transitively() {
        let (apps, errors) = check_set(vec![
            with_port(app("alpha", &[]), 8080, Protocol::Tcp),
            with_port(app("beta", &[]), 8080, Protocol::Tcp),
            app("gamma", &["beta"]),
            app("delta", &["gamma"]),
            app("omega", &["alpha"]),
        ]);
        assert_eq!(ids(&apps), ["alpha", "omega"]);
        let gamma = errors_of(&errors, "gamma");
        assert_eq!(gamma.len(), 1, "{gamma:#?}");
        assert!(
            gamma[0].problem.contains("depends on beta, which is invalid"),
            "{}",
            gamma[0]
        );
        let delta = errors_of(&errors, "delta");
        assert_eq!(delta.len(), 1, "{delta:#?}");
        assert!(
            delta[0].problem.contains("depends on gamma, which is invalid"),
            "{}",
            delta[0]
        );
    }

    #[test]
    fn shared_secret_declared_with_different_kinds_is_refused() {
        let (apps, errors) = check_set(vec![
            with_secret(app("one", &[]), "rpc-pass", SecretKind::Hex32),
            with_secret(app("two", &[]), "rpc-pass", SecretKind::Hex16),
        ]);
        assert_eq!(ids(&apps), ["one"]);
        assert_eq!(errors.len(), 1, "{errors:#?}");
        let e = &errors[0];
        assert_eq!(e.file, PathBuf::from("/apps/two/manifest.yml"));
        assert_eq!(e.field, "secrets[0].kind");
        assert_eq!(e.value.as_deref(), Some("hex16"));
        assert!(e.problem.contains("secret rpc-pass is declared as"), "{e}");
        assert!(e.problem.contains("by one"), "{e}");
    }

    #[test]
    fn shared_secret_declared_alike_is_fine() {
        let (apps, errors) = check_set(vec![
            with_secret(app("one", &[]), "rpc-pass", SecretKind::Hex32),
            with_secret(app("two", &[]), "rpc-pass", SecretKind::Hex32),
        ]);
        assert!(errors.is_empty(), "{errors:#?}");
        assert_eq!(ids(&apps), ["one", "two"]);
    }
}
