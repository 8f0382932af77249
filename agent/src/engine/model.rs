//! The engine's answers read leniently: every field is optional, unknown
//! values are kept as text, and nothing one container says can fail the
//! reading of another.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde_json::{Map, Value};

use super::error::EngineError;
use super::Result;

/// A container's state as the engine names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ContainerStatus {
    Created,
    Running,
    Paused,
    Restarting,
    Removing,
    Stopping,
    /// Podman only: the process has exited, but the engine has not cleaned
    /// up after it yet (a brief state between `Running` and `Exited`).
    Stopped,
    Exited,
    Dead,
    /// A state this module does not know, as the engine wrote it (empty
    /// when the engine gave none).
    Other(String),
}

impl ContainerStatus {
    pub fn parse(text: &str) -> ContainerStatus {
        match text {
            // Podman's own names for what Docker calls created; the
            // Docker API maps them, but a leaked one means the same.
            "created" | "configured" | "initialized" => ContainerStatus::Created,
            "running" => ContainerStatus::Running,
            "paused" => ContainerStatus::Paused,
            "restarting" => ContainerStatus::Restarting,
            "removing" => ContainerStatus::Removing,
            "stopping" => ContainerStatus::Stopping,
            "stopped" => ContainerStatus::Stopped,
            "exited" => ContainerStatus::Exited,
            "dead" => ContainerStatus::Dead,
            other => ContainerStatus::Other(other.to_owned()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            ContainerStatus::Created => "created",
            ContainerStatus::Running => "running",
            ContainerStatus::Paused => "paused",
            ContainerStatus::Restarting => "restarting",
            ContainerStatus::Removing => "removing",
            ContainerStatus::Stopping => "stopping",
            ContainerStatus::Stopped => "stopped",
            ContainerStatus::Exited => "exited",
            ContainerStatus::Dead => "dead",
            ContainerStatus::Other(text) => text,
        }
    }

    /// Whether the container's process has ended: `Stopped`, `Exited`, `Dead`.
    pub fn has_ended(&self) -> bool {
        matches!(
            self,
            ContainerStatus::Stopped | ContainerStatus::Exited | ContainerStatus::Dead
        )
    }
}

impl std::fmt::Display for ContainerStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One container of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerSummary {
    pub id: String,
    /// Without Docker's leading `/`.
    pub name: String,
    pub status: ContainerStatus,
    pub labels: BTreeMap<String, String>,
    /// The reference the container was created from.
    pub image: String,
    /// `sha256:…` of the image config the container runs.
    pub image_id: String,
    /// The exit code of a container whose process ended, when the listing
    /// tells it (Podman's `ExitCode`, or Docker's `Status` text "Exited (137) …").
    pub exit_code: Option<i64>,
}

/// The engine's containers, as one pass sees them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    pub containers: Vec<ContainerSummary>,
    /// Containers the engine lists but cannot describe: reported with the
    /// engine's error, never acted on.
    pub unobservable: Vec<Unobservable>,
}

/// A container the engine lists but cannot inspect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unobservable {
    pub id: String,
    /// Without Docker's leading `/`.
    pub name: String,
    /// The engine's error, its whole chain.
    pub error: String,
}

impl Listing {
    /// Sorts a one-by-one listing: each listed container with what
    /// inspecting it gave. One gone since the listing (`NotFound`) is left
    /// out; one that fails otherwise is unobservable, with the error.
    pub fn from_inspected(inspected: Vec<(ContainerSummary, Result<ContainerInfo>)>) -> Listing {
        let mut listing = Listing::default();
        for (summary, result) in inspected {
            match result {
                Ok(_) => listing.containers.push(summary),
                Err(EngineError::NotFound { .. }) => {}
                Err(e) => {
                    tracing::warn!(container = %summary.name, error = %crate::error_chain(&e), "the engine cannot describe this container");
                    listing.unobservable.push(Unobservable {
                        id: summary.id,
                        name: summary.name,
                        error: crate::error_chain(&e),
                    });
                }
            }
        }
        listing
    }
}

/// One container, inspected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
    pub id: String,
    /// Without Docker's leading `/`.
    pub name: String,
    pub status: ContainerStatus,
    /// Set once the process has ended (`Stopped`, `Exited`, `Dead`).
    pub exit_code: Option<i64>,
    /// `sha256:…` of the image config the container runs.
    pub image_id: String,
    /// The reference the container was created from.
    pub image: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// RFC 3339; `None` before the first start.
    pub started_at: Option<String>,
    /// RFC 3339; `None` until the process first ends.
    pub finished_at: Option<String>,
    pub oom_killed: bool,
    /// The container's address on each network it joined; an IPv4 address
    /// where it has both.
    pub ips: BTreeMap<String, IpAddr>,
    /// The effective entrypoint (the image's unless overridden); `None`
    /// when there is none (Podman reports `[]`).
    pub entrypoint: Option<Vec<String>>,
    /// The effective command (the image's unless overridden or unless an
    /// overriding entrypoint discarded it).
    pub cmd: Option<Vec<String>>,
    /// `KEY=value`, the image's environment merged with the container's.
    pub env: Vec<String>,
    /// How often the engine restarted it; always 0 with restart policy "no".
    pub restart_count: i64,
    /// How long a stop waits after the stop signal before SIGKILL, as the
    /// container was created with (`Config.StopTimeout`).
    pub stop_timeout: Option<std::time::Duration>,
}

impl ContainerInfo {
    /// Reads the text of an inspect answer (`GET /containers/{name}/json`)
    /// as [`crate::engine::Engine::inspect`] does: for tests and tools that
    /// work from captured answers.
    pub fn from_inspect_json(text: &str) -> Result<ContainerInfo> {
        let what = "an inspect answer";
        let value: Value = serde_json::from_str(text).map_err(|e| EngineError::Decode {
            what: what.to_owned(),
            message: e.to_string(),
        })?;
        parse_inspect(&value, what)
    }
}

/// What an event is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EventKind {
    Container,
    Image,
    Network,
    Volume,
    /// Podman only.
    Pod,
    /// A type this module does not know, as the engine wrote it.
    Other(String),
}

impl EventKind {
    pub fn parse(text: &str) -> EventKind {
        match text {
            "container" => EventKind::Container,
            "image" => EventKind::Image,
            "network" => EventKind::Network,
            "volume" => EventKind::Volume,
            "pod" => EventKind::Pod,
            other => EventKind::Other(other.to_owned()),
        }
    }
}

/// One line of the engine's event stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineEvent {
    pub kind: EventKind,
    /// `create`, `start`, `die`, `cleanup`, `remove`, `pull`, …
    pub action: String,
    /// The object's id; empty for some image events.
    pub id: String,
    /// `name` from the event's attributes: the container's name for
    /// container events.
    pub name: Option<String>,
    pub attributes: BTreeMap<String, String>,
    /// Nanoseconds since the Unix epoch.
    pub time_nano: Option<i64>,
}

fn text(object: &Map<String, Value>, key: &str) -> Option<String> {
    object.get(key).and_then(Value::as_str).map(str::to_owned)
}

fn object(value: Option<&Value>) -> Option<&Map<String, Value>> {
    value.and_then(Value::as_object)
}

/// A JSON object's string values; values of other types are left out.
fn string_map(value: Option<&Value>) -> BTreeMap<String, String> {
    object(value)
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_owned())))
        .collect()
}

/// A list of strings; a lone string (old Docker API style) is a list of one.
fn string_list(value: Option<&Value>) -> Option<Vec<String>> {
    match value? {
        Value::Array(items) => Some(items.iter().filter_map(Value::as_str).map(str::to_owned).collect()),
        Value::String(s) => Some(vec![s.clone()]),
        _ => None,
    }
}

fn without_slash(name: &str) -> String {
    name.strip_prefix('/').unwrap_or(name).to_owned()
}

/// Podman's "never": Go's zero time.
fn timestamp(object: &Map<String, Value>, key: &str) -> Option<String> {
    text(object, key).filter(|t| !t.is_empty() && !t.starts_with("0001-01-01"))
}

/// Reads `GET /containers/json`. Entries without an id cannot be acted on
/// and are left out (with a warning); every other entry is kept, whatever
/// it says.
pub(crate) fn parse_summaries(value: &Value) -> Result<Vec<ContainerSummary>> {
    let entries = value.as_array().ok_or_else(|| EngineError::Decode {
        what: "the container list".into(),
        message: format!("expected an array, got {}", kind_of(value)),
    })?;
    let mut summaries = Vec::with_capacity(entries.len());
    for entry in entries {
        match parse_summary(entry) {
            Some(summary) => summaries.push(summary),
            None => tracing::warn!(entry = %entry, "container list entry without an id, ignored"),
        }
    }
    Ok(summaries)
}

fn parse_summary(entry: &Value) -> Option<ContainerSummary> {
    let c = entry.as_object()?;
    let id = text(c, "Id").filter(|id| !id.is_empty())?;
    let name = string_list(c.get("Names"))
        .and_then(|names| names.into_iter().next())
        .map(|n| without_slash(&n))
        .unwrap_or_default();
    let status = ContainerStatus::parse(&text(c, "State").unwrap_or_default());
    let exit_code = text(c, "Status")
        .as_deref()
        .and_then(exit_code_of_status)
        .or_else(|| c.get("ExitCode").and_then(Value::as_i64))
        .filter(|_| status.has_ended());
    Some(ContainerSummary {
        id,
        name,
        status,
        exit_code,
        labels: string_map(c.get("Labels")),
        image: text(c, "Image").unwrap_or_default(),
        image_id: text(c, "ImageID").unwrap_or_default(),
    })
}

/// The code in a Docker-style status text: `Exited (137) 3 seconds ago`.
fn exit_code_of_status(status: &str) -> Option<i64> {
    let rest = status.strip_prefix("Exited (")?;
    rest.split_once(')')?.0.parse().ok()
}

/// Reads `GET /containers/{name}/json`.
pub(crate) fn parse_inspect(value: &Value, what: &str) -> Result<ContainerInfo> {
    let c = value.as_object().ok_or_else(|| EngineError::Decode {
        what: what.to_owned(),
        message: format!("expected an object, got {}", kind_of(value)),
    })?;
    let id = text(c, "Id").ok_or_else(|| EngineError::Decode {
        what: what.to_owned(),
        message: "the answer has no Id".into(),
    })?;
    let empty = Map::new();
    let state = object(c.get("State")).unwrap_or(&empty);
    let config = object(c.get("Config")).unwrap_or(&empty);
    let status = ContainerStatus::parse(&text(state, "Status").unwrap_or_default());
    let exit_code = state
        .get("ExitCode")
        .and_then(Value::as_i64)
        .filter(|_| status.has_ended());
    Ok(ContainerInfo {
        id,
        name: without_slash(&text(c, "Name").unwrap_or_default()),
        status,
        exit_code,
        image_id: text(c, "Image").unwrap_or_default(),
        image: text(config, "Image"),
        labels: string_map(config.get("Labels")),
        started_at: timestamp(state, "StartedAt"),
        finished_at: timestamp(state, "FinishedAt"),
        oom_killed: state.get("OOMKilled").and_then(Value::as_bool).unwrap_or(false),
        ips: addresses(object(c.get("NetworkSettings")).and_then(|n| object(n.get("Networks")))),
        entrypoint: string_list(config.get("Entrypoint")).filter(|e| !e.is_empty()),
        cmd: string_list(config.get("Cmd")).filter(|c| !c.is_empty()),
        env: string_list(config.get("Env")).unwrap_or_default(),
        restart_count: c.get("RestartCount").and_then(Value::as_i64).unwrap_or(0),
        stop_timeout: config
            .get("StopTimeout")
            .and_then(Value::as_u64)
            .map(std::time::Duration::from_secs),
    })
}

fn addresses(networks: Option<&Map<String, Value>>) -> BTreeMap<String, IpAddr> {
    let mut ips = BTreeMap::new();
    for (network, settings) in networks.into_iter().flatten() {
        let Some(settings) = settings.as_object() else {
            continue;
        };
        let address = ["IPAddress", "GlobalIPv6Address"]
            .iter()
            .filter_map(|key| text(settings, key))
            .find_map(|a| a.parse::<IpAddr>().ok());
        if let Some(address) = address {
            ips.insert(network.clone(), address);
        }
    }
    ips
}

/// Reads one line of `GET /events`.
pub(crate) fn parse_event(value: &Value) -> Result<EngineEvent> {
    let e = value.as_object().ok_or_else(|| EngineError::Decode {
        what: "an engine event".into(),
        message: format!("expected an object, got {}", kind_of(value)),
    })?;
    let empty = Map::new();
    let actor = object(e.get("Actor")).unwrap_or(&empty);
    let attributes = string_map(actor.get("Attributes"));
    Ok(EngineEvent {
        kind: EventKind::parse(&text(e, "Type").unwrap_or_default()),
        action: text(e, "Action").or_else(|| text(e, "status")).unwrap_or_default(),
        id: text(actor, "ID")
            .filter(|id| !id.is_empty())
            .or_else(|| text(e, "id"))
            .unwrap_or_default(),
        name: attributes.get("name").cloned(),
        attributes,
        time_nano: e.get("timeNano").and_then(Value::as_i64),
    })
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    //! Fixtures are answers captured from Podman 4.3.1's Docker API; see
    //! `agent/tests/fixtures/engine/README.md`.

    use super::*;

    const LIST: &str = include_str!("../../tests/fixtures/engine/podman-4.3.1-list.json");
    const INSPECT_STOPPED: &str = include_str!("../../tests/fixtures/engine/podman-4.3.1-inspect_stopped.json");
    const INSPECT_RUNNING: &str = include_str!("../../tests/fixtures/engine/podman-4.3.1-inspect_running.json");
    const EVENTS: &str = include_str!("../../tests/fixtures/engine/podman-4.3.1-events.jsonl");

    fn json(text: &str) -> Value {
        serde_json::from_str(text).expect("fixture is JSON")
    }

    #[test]
    fn a_listed_exit_code_is_read_from_the_status_text_or_podmans_field_for_ended_containers_only() {
        assert_eq!(exit_code_of_status("Exited (137) 3 seconds ago"), Some(137));
        assert_eq!(exit_code_of_status("Up 1 second"), None);
        let list = parse_summaries(&json(LIST)).expect("parses");
        let codes: Vec<(ContainerStatus, Option<i64>)> = list.iter().map(|c| (c.status.clone(), c.exit_code)).collect();
        assert!(codes.contains(&(ContainerStatus::Stopped, Some(0))), "{codes:?}");
        assert!(
            codes.iter().all(|(s, code)| s.has_ended() || code.is_none()),
            "{codes:?}"
        );
        // Podman's own listing says it in a field of its own.
        let libpod = serde_json::json!([{"Id": "a", "Names": ["x"], "State": "exited", "Status": "", "ExitCode": 3}]);
        assert_eq!(parse_summaries(&libpod).expect("parses")[0].exit_code, Some(3));
    }

    fn by_name<'a>(list: &'a [ContainerSummary], name: &str) -> &'a ContainerSummary {
        list.iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("{name} missing from {list:#?}"))
    }

    #[test]
    fn bollard_itself_refuses_podmans_stopped_state() {
        // Why the raw client exists: if this ever decodes, bollard learnt
        // Podman's states and the workaround can be reconsidered.
        let err = serde_json::from_str::<Vec<bollard::models::ContainerSummary>>(LIST)
            .expect_err("bollard now decodes 'stopped'");
        assert!(err.to_string().contains("`stopped`"), "{err}");
    }

    #[test]
    fn a_listing_with_podman_only_states_and_a_pod_reads_every_container() {
        let list = parse_summaries(&json(LIST)).expect("lenient parse");
        assert_eq!(list.len(), 5, "{list:#?}");
        let app = by_name(&list, "fixture-app");
        assert_eq!(app.status, ContainerStatus::Stopped);
        assert_eq!(app.labels.get("io.archipelago.app").map(String::as_str), Some("demo"));
        assert!(app.image_id.starts_with("sha256:"), "{app:?}");
        assert_eq!(by_name(&list, "fixture-stopping").status, ContainerStatus::Stopping);
        assert_eq!(by_name(&list, "fixture-created").status, ContainerStatus::Created);
        assert_eq!(by_name(&list, "fixture-pod-infra").status, ContainerStatus::Running);
        assert_eq!(by_name(&list, "fixture-pod-member").image, "localhost/bb:latest");
    }

    #[test]
    fn an_unknown_state_is_kept_as_text_and_the_other_containers_still_read() {
        let mut value = json(LIST);
        let entries = value.as_array_mut().expect("an array");
        entries[0]["State"] = Value::from("bad state");
        entries[1]["State"] = Value::Null;
        entries[2]["Labels"] = Value::Null;
        entries[3]["Labels"] = serde_json::json!({"n": 1, "s": "kept"});
        let list = parse_summaries(&value).expect("lenient parse");
        assert_eq!(list.len(), 5);
        assert_eq!(list[0].status, ContainerStatus::Other("bad state".into()));
        assert_eq!(list[1].status, ContainerStatus::Other(String::new()));
        assert!(list[2].labels.is_empty());
        assert_eq!(list[3].labels, BTreeMap::from([("s".to_owned(), "kept".to_owned())]));
    }

    #[test]
    fn a_list_entry_without_an_id_is_left_out_and_a_non_list_is_a_decode_error() {
        let value = serde_json::json!([{"Names": ["/x"]}, {"Id": "abc", "Names": ["/y"], "State": "running"}]);
        let list = parse_summaries(&value).expect("parse");
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].name, "y");
        let err = parse_summaries(&serde_json::json!({"message": "x"})).expect_err("an object is no list");
        assert!(matches!(err, EngineError::Decode { .. }), "{err:?}");
    }

    #[test]
    fn inspecting_a_stopped_container_reads_state_config_and_addresses() {
        let info = parse_inspect(&json(INSPECT_STOPPED), "container fixture-app").expect("lenient parse");
        assert_eq!(info.name, "fixture-app");
        assert_eq!(info.status, ContainerStatus::Stopped);
        assert_eq!(info.exit_code, Some(0));
        assert_eq!(info.entrypoint, Some(vec!["/bin/sh".to_owned()]));
        assert_eq!(info.cmd, Some(vec!["-c".to_owned(), "sleep 0.7".to_owned()]));
        assert!(
            info.env.contains(&"SECRET_FILE=/run/secrets/token".to_owned()),
            "{:?}",
            info.env
        );
        assert_eq!(
            info.ips.get("fixture-net"),
            Some(&"10.89.0.2".parse::<IpAddr>().expect("an address"))
        );
        assert!(info.started_at.is_some() && info.finished_at.is_some(), "{info:?}");
        assert!(!info.oom_killed);
        assert_eq!(info.restart_count, 0);
        assert_eq!(info.stop_timeout, Some(std::time::Duration::from_secs(10)));
        assert!(info.image_id.starts_with("sha256:"));
    }

    #[test]
    fn inspecting_a_running_container_has_no_exit_code_nor_finish_time_and_an_empty_entrypoint_is_none() {
        let info = parse_inspect(&json(INSPECT_RUNNING), "container fixture-pod-member").expect("parse");
        assert_eq!(info.status, ContainerStatus::Running);
        assert_eq!(info.exit_code, None);
        assert_eq!(info.finished_at, None, "Go's zero time means never");
        assert_eq!(info.entrypoint, None, "Podman reports [] for no entrypoint");
        assert_eq!(info.cmd, Some(vec!["sleep".to_owned(), "300".to_owned()]));
    }

    #[test]
    fn an_unknown_inspect_state_is_kept_and_an_answer_without_id_is_a_decode_error() {
        let mut value = json(INSPECT_STOPPED);
        value["State"]["Status"] = Value::from("unknown");
        let info = parse_inspect(&value, "c").expect("parse");
        assert_eq!(info.status, ContainerStatus::Other("unknown".into()));
        assert_eq!(info.exit_code, None, "only an ended process has an exit code");
        let err = parse_inspect(&serde_json::json!({"Name": "/x"}), "container x").expect_err("no id");
        assert!(
            matches!(&err, EngineError::Decode { what, .. } if what == "container x"),
            "{err:?}"
        );
    }

    #[test]
    fn pod_events_are_kept_with_their_type_and_container_events_name_the_container() {
        let events: Vec<EngineEvent> = EVENTS.lines().map(|l| parse_event(&json(l)).expect("event")).collect();
        assert!(events.len() > 10, "{}", events.len());
        let pod = events.iter().find(|e| e.kind == EventKind::Pod).expect("a pod event");
        assert_eq!(pod.name.as_deref(), Some("fixture-pod"));
        assert!(!pod.id.is_empty());
        let died = events
            .iter()
            .find(|e| e.kind == EventKind::Container && e.action == "die")
            .expect("a die event");
        assert!(died.attributes.contains_key("exitCode"), "{died:?}");
        assert!(died.time_nano.is_some());
        let unknown = parse_event(&serde_json::json!({"Type": "machine", "Action": "boot"})).expect("event");
        assert_eq!(unknown.kind, EventKind::Other("machine".into()));
    }

    #[test]
    fn bollard_itself_refuses_a_pod_event() {
        let line = EVENTS
            .lines()
            .find(|l| l.contains(r#""Type":"pod""#))
            .expect("a pod event in the fixture");
        let err = serde_json::from_str::<bollard::models::EventMessage>(line).expect_err("bollard now decodes 'pod'");
        assert!(err.to_string().contains("`pod`"), "{err}");
    }
}
