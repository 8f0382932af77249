use super::super::load::parse;
use super::super::{Health, ManifestError, Probe};
use super::*;
use crate::dataroot::DEFAULT_DATA_ROOT;

const IMG: &str =
    "docker.io/library/busybox:1.36@sha256:c991fd3d8b19614fa7309525e8ccb6c0a87464f8bf6bd4dff1479b493f7308f2";

/// A manifest for app `app` with the required fields and an image, plus `extra`.
fn app(extra: &str) -> String {
    format!("id: app\nname: App\nversion: \"1.0\"\nimage: {IMG}\n{extra}")
}

/// Like [`app`] but without `image`, for the image/build rules.
fn bare(extra: &str) -> String {
    format!("id: app\nname: App\nversion: \"1.0\"\n{extra}")
}

/// Parses and validates `yaml` as `/apps/<folder>/manifest.yml`.
fn check_in(folder: &Path, data_root: &str, yaml: &str) -> Result<Manifest, Vec<ManifestError>> {
    let file = folder.join("manifest.yml");
    let raw = parse(&file, yaml).map_err(|e| vec![e])?;
    validate(
        raw,
        &Context {
            file: &file,
            app_dir: folder,
            data_root: &DataRoot::new(data_root),
        },
    )
}

fn check(yaml: &str) -> Result<Manifest, Vec<ManifestError>> {
    check_in(Path::new("/apps/app"), DEFAULT_DATA_ROOT, yaml)
}

fn ok(yaml: &str) -> Manifest {
    check(yaml).unwrap_or_else(|errs| panic!("expected a valid manifest, got {errs:#?}\n{yaml}"))
}

/// The error on `field`; fails when the manifest is valid or has none there.
fn err_on(result: Result<Manifest, Vec<ManifestError>>, field: &str) -> ManifestError {
    match result {
        Ok(m) => panic!("expected an error on {field}, but the manifest is valid: {m:#?}"),
        Err(errs) => errs
            .iter()
            .find(|e| e.field == field)
            .cloned()
            .unwrap_or_else(|| panic!("no error on {field}; errors: {errs:#?}")),
    }
}

/// Asserts an error on `field` with `value` whose text contains `says`.
fn assert_refused(yaml: &str, field: &str, value: Option<&str>, says: &str) {
    let e = err_on(check(yaml), field);
    assert_eq!(e.value.as_deref(), value, "value of {e}");
    assert!(e.problem.contains(says), "{e:?} should say {says:?}");
    assert!(e.to_string().contains(field), "{e} should name {field}");
    assert_eq!(e.file, Path::new("/apps/app/manifest.yml"), "{e}");
}

// ---- id, name, version -------------------------------------------------

#[test]
fn minimal_manifest_is_valid_and_keeps_its_fields() {
    let m = ok(&app(""));
    assert_eq!(m.id.as_str(), "app");
    assert_eq!(m.name, "App");
    assert_eq!(m.version, "1.0");
    assert_eq!(m.path, Path::new("/apps/app/manifest.yml"));
    assert_eq!(m.pinned_image().map(|p| p.to_string()).as_deref(), Some(IMG));
}

#[test]
fn id_with_uppercase_is_refused_with_the_rule() {
    let yaml = format!("id: MyApp\nname: x\nversion: \"1\"\nimage: {IMG}\n");
    let e = err_on(check_in(Path::new("/apps/MyApp"), DEFAULT_DATA_ROOT, &yaml), "id");
    assert_eq!(e.value.as_deref(), Some("MyApp"));
    assert!(e.problem.contains("lowercase letters, digits and '-'"), "{e}");
}

#[test]
fn id_with_characters_outside_the_rule_is_refused() {
    for bad in ["my_app", "my.app", "my app", "app!", "-app"] {
        let yaml = format!("id: \"{bad}\"\nname: x\nversion: \"1\"\nimage: {IMG}\n");
        let e = err_on(check_in(&Path::new("/apps").join(bad), DEFAULT_DATA_ROOT, &yaml), "id");
        assert_eq!(e.value.as_deref(), Some(bad));
        assert!(e.problem.contains("starting with a letter"), "{e}");
    }
}

#[test]
fn id_starting_with_a_digit_is_refused() {
    let yaml = format!("id: \"1app\"\nname: x\nversion: \"1\"\nimage: {IMG}\n");
    let e = err_on(check_in(Path::new("/apps/1app"), DEFAULT_DATA_ROOT, &yaml), "id");
    assert_eq!(e.value.as_deref(), Some("1app"));
    assert!(e.problem.contains("starting with a letter"), "{e}");
}

#[test]
fn id_of_63_characters_is_the_longest_allowed() {
    let id63 = format!("a{}", "b".repeat(62));
    let id64 = format!("a{}", "b".repeat(63));
    for (id, valid) in [(&id63, true), (&id64, false)] {
        let yaml = format!("id: {id}\nname: x\nversion: \"1\"\nimage: {IMG}\n");
        let result = check_in(&Path::new("/apps").join(id), DEFAULT_DATA_ROOT, &yaml);
        assert_eq!(result.is_ok(), valid, "{} characters", id.len());
        if !valid {
            let e = err_on(result, "id");
            assert!(e.problem.contains("at most 63 characters"), "{e}");
            assert_eq!(e.value.as_deref(), Some(id.as_str()));
        }
    }
}

#[test]
fn id_must_equal_the_folder_name() {
    let e = err_on(check_in(Path::new("/apps/other"), DEFAULT_DATA_ROOT, &app("")), "id");
    assert_eq!(e.value.as_deref(), Some("app"));
    assert!(e.problem.contains("must equal the app's folder name \"other\""), "{e}");
}

#[test]
fn empty_name_is_refused() {
    assert_refused(
        &format!("id: app\nname: \" \"\nversion: \"1\"\nimage: {IMG}\n"),
        "name",
        Some(" "),
        "must not be empty",
    );
}

#[test]
fn empty_version_is_refused() {
    assert_refused(
        &format!("id: app\nname: App\nversion: \"\"\nimage: {IMG}\n"),
        "version",
        Some(""),
        "must not be empty",
    );
}

// ---- kind and container_name ---------------------------------------------

#[test]
fn kind_defaults_to_ui_when_the_id_ends_with_dash_ui() {
    let yaml = format!("id: wallet-ui\nname: x\nversion: \"1\"\nimage: {IMG}\n");
    let m = check_in(Path::new("/apps/wallet-ui"), DEFAULT_DATA_ROOT, &yaml).expect("valid");
    assert_eq!(m.kind, AppKind::Ui);
}

#[test]
fn kind_defaults_to_service_otherwise() {
    assert_eq!(ok(&app("")).kind, AppKind::Service);
    // "-ui" must be a suffix, not just anywhere in the id.
    let yaml = format!("id: ui-gateway\nname: x\nversion: \"1\"\nimage: {IMG}\n");
    let m = check_in(Path::new("/apps/ui-gateway"), DEFAULT_DATA_ROOT, &yaml).expect("valid");
    assert_eq!(m.kind, AppKind::Service);
}

#[test]
fn explicit_kind_wins_over_the_id_suffix() {
    let yaml = format!("id: admin-ui\nname: x\nversion: \"1\"\nkind: service\nimage: {IMG}\n");
    let m = check_in(Path::new("/apps/admin-ui"), DEFAULT_DATA_ROOT, &yaml).expect("valid");
    assert_eq!(m.kind, AppKind::Service);
    assert_eq!(ok(&app("kind: ui\n")).kind, AppKind::Ui);
}

#[test]
fn unknown_kind_is_refused_listing_the_kinds() {
    assert_refused(&app("kind: daemon\n"), "kind", Some("daemon"), "allowed: service, ui");
}

#[test]
fn container_name_is_kept_when_valid_and_refused_when_not() {
    assert_eq!(
        ok(&app("container_name: bitcoin\n")).container_name.as_deref(),
        Some("bitcoin")
    );
    assert_refused(
        &app("container_name: \"-bad name\"\n"),
        "container_name",
        Some("-bad name"),
        "starting with a letter or digit",
    );
}

// ---- depends_on ------------------------------------------------------------

#[test]
fn depends_on_keeps_ids_in_order() {
    let m = ok(&app("depends_on: [db, cache]\n"));
    let deps: Vec<&str> = m.depends_on.iter().map(AppId::as_str).collect();
    assert_eq!(deps, ["db", "cache"]);
}

#[test]
fn depends_on_entry_that_is_not_an_id_is_refused() {
    assert_refused(
        &app("depends_on: [db, Bad_Dep]\n"),
        "depends_on[1]",
        Some("Bad_Dep"),
        "allowed: an app id",
    );
}

#[test]
fn depends_on_listing_an_app_twice_is_refused() {
    assert_refused(
        &app("depends_on: [db, db]\n"),
        "depends_on[1]",
        Some("db"),
        "listed twice",
    );
}

// ---- image and build ---------------------------------------------------------

#[test]
fn image_with_a_tag_alone_is_refused() {
    assert_refused(
        &bare("image: docker.io/library/nginx:1.27\n"),
        "image",
        Some("docker.io/library/nginx:1.27"),
        "not pinned by digest",
    );
}

#[test]
fn image_with_a_malformed_digest_is_refused() {
    assert_refused(
        &bare("image: nginx@sha256:abc123\n"),
        "image",
        Some("nginx@sha256:abc123"),
        "64 lowercase hex",
    );
}

#[test]
fn image_and_build_together_are_refused() {
    assert_refused(
        &bare(&format!("image: {IMG}\nbuild: {{ context: . }}\n")),
        "image",
        None,
        "both set; allowed: exactly one",
    );
}

#[test]
fn neither_image_nor_build_is_refused() {
    assert_refused(&bare(""), "image", None, "neither `image` nor `build`");
}

#[test]
fn build_context_resolves_inside_the_app_folder_with_a_default_containerfile() {
    let m = ok(&bare("build: { context: ui }\n"));
    assert_eq!(
        m.image,
        ImageSource::Build {
            context: PathBuf::from("/apps/app/ui"),
            containerfile: PathBuf::from("Containerfile"),
        }
    );
    assert_eq!(m.pinned_image(), None);
}

#[test]
fn build_context_leaving_the_app_folder_is_refused() {
    assert_refused(
        &bare("build: { context: ../other }\n"),
        "build.context",
        Some("../other"),
        "stays inside the app's folder",
    );
    assert_refused(
        &bare("build: { context: ui/../.. }\n"),
        "build.context",
        Some("ui/../.."),
        "stays inside the app's folder",
    );
}

#[test]
fn absolute_build_context_is_refused() {
    assert_refused(
        &bare("build: { context: /srv/src }\n"),
        "build.context",
        Some("/srv/src"),
        "must be a relative path",
    );
}

#[cfg(unix)]
#[test]
fn build_context_symlinked_out_of_the_app_folder_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let folder = tmp.path().join("app");
    std::fs::create_dir_all(folder.join("inside")).expect("mkdir");
    std::os::unix::fs::symlink(tmp.path(), folder.join("escape")).expect("symlink");
    let e = err_on(
        check_in(&folder, DEFAULT_DATA_ROOT, &bare("build: { context: escape }\n")),
        "build.context",
    );
    assert_eq!(e.value.as_deref(), Some("escape"));
    let m = check_in(&folder, DEFAULT_DATA_ROOT, &bare("build: { context: inside }\n")).expect("valid");
    assert!(matches!(m.image, ImageSource::Build { ref context, .. } if context == &folder.join("inside")));
}

#[test]
fn containerfile_outside_the_context_is_refused() {
    assert_refused(
        &bare("build: { context: ., containerfile: ../Containerfile }\n"),
        "build.containerfile",
        Some("../Containerfile"),
        "relative path inside the build context",
    );
    assert_refused(
        &bare("build: { context: ., containerfile: /etc/passwd }\n"),
        "build.containerfile",
        Some("/etc/passwd"),
        "relative path inside the build context",
    );
}

// ---- entrypoint, command, user, network ---------------------------------------

#[test]
fn entrypoint_and_command_are_kept_apart() {
    let m = ok(&app("entrypoint: [electrs]\ncommand: [\"--conf\", /etc/e.toml]\n"));
    assert_eq!(m.entrypoint, Some(vec!["electrs".to_owned()]));
    assert_eq!(m.command, Some(vec!["--conf".to_owned(), "/etc/e.toml".to_owned()]));
    let only_command = ok(&app("command: [run]\n"));
    assert_eq!(only_command.entrypoint, None);
    assert_eq!(only_command.command, Some(vec!["run".to_owned()]));
}

#[test]
fn empty_entrypoint_is_refused_but_empty_command_is_kept() {
    assert_refused(&app("entrypoint: []\n"), "entrypoint", None, "must not be empty");
    assert_eq!(ok(&app("command: []\n")).command, Some(vec![]));
}

#[test]
fn numeric_user_and_uid_gid_are_accepted() {
    assert_eq!(ok(&app("user: \"1000:1000\"\n")).user.as_deref(), Some("1000:1000"));
    assert_eq!(ok(&app("user: \"1000\"\n")).user.as_deref(), Some("1000"));
}

#[test]
fn non_numeric_user_is_refused() {
    assert_refused(&app("user: bitcoin\n"), "user", Some("bitcoin"), "\"1000:1000\"");
    assert_refused(&app("user: \"1000:staff\"\n"), "user", Some("1000:staff"), "UID:GID");
}

#[test]
fn network_defaults_to_archy_net() {
    assert_eq!(ok(&app("")).network, "archy-net");
    assert_eq!(ok(&app("network: lan\n")).network, "lan");
}

#[test]
fn invalid_network_name_is_refused() {
    assert_refused(&app("network: \"my net\"\n"), "network", Some("my net"), "allowed:");
}

// ---- ports ------------------------------------------------------------------

#[test]
fn ports_keep_host_container_and_protocol_with_tcp_by_default() {
    let m = ok(&app(
        "ports: [{ host: 8080, container: 80 }, { host: 65535, container: 1, protocol: udp }]\n",
    ));
    assert_eq!(
        m.ports,
        [
            PortMapping {
                host: 8080,
                container: 80,
                protocol: Protocol::Tcp
            },
            PortMapping {
                host: 65535,
                container: 1,
                protocol: Protocol::Udp
            },
        ]
    );
}

#[test]
fn port_zero_is_refused() {
    assert_refused(
        &app("ports: [{ host: 0, container: 80 }]\n"),
        "ports[0].host",
        Some("0"),
        "from 1 to 65535",
    );
}

#[test]
fn port_above_65535_is_refused() {
    assert_refused(
        &app("ports: [{ host: 8080, container: 80 }, { host: 8081, container: 70000 }]\n"),
        "ports[1].container",
        Some("70000"),
        "from 1 to 65535",
    );
}

#[test]
fn negative_port_is_refused() {
    assert_refused(
        &app("ports: [{ host: -80, container: 80 }]\n"),
        "ports[0].host",
        Some("-80"),
        "from 1 to 65535",
    );
}

#[test]
fn unknown_protocol_is_refused() {
    assert_refused(
        &app("ports: [{ host: 8080, container: 80, protocol: sctp }]\n"),
        "ports[0].protocol",
        Some("sctp"),
        "allowed: tcp, udp",
    );
}

#[test]
fn same_host_port_twice_in_one_app_is_refused_but_tcp_and_udp_may_share() {
    assert_refused(
        &app("ports: [{ host: 8080, container: 80 }, { host: 8080, container: 81 }]\n"),
        "ports[1].host",
        Some("8080"),
        "published twice",
    );
    let m = ok(&app(
        "ports: [{ host: 53, container: 53 }, { host: 53, container: 53, protocol: udp }]\n",
    ));
    assert_eq!(m.ports.len(), 2);
}

// ---- volumes ------------------------------------------------------------------

#[test]
fn volume_sources_are_app_data_names_or_absolute_inside_the_data_root() {
    let m = ok(&app(
        "volumes:\n  - { source: data, target: /data }\n  - { source: /var/lib/archipelago/other/x, target: /x, read_only: true }\n",
    ));
    assert_eq!(
        m.volumes,
        [
            VolumeMount {
                source: VolumeSource::AppData(PathBuf::from("data")),
                target: "/data".to_owned(),
                read_only: false,
            },
            VolumeMount {
                source: VolumeSource::Absolute(PathBuf::from("/var/lib/archipelago/other/x")),
                target: "/x".to_owned(),
                read_only: true,
            },
        ]
    );
}

#[test]
fn volume_source_with_dotdot_is_refused() {
    assert_refused(
        &app("volumes: [{ source: ../other/data, target: /data }]\n"),
        "volumes[0].source",
        Some("../other/data"),
        "'..' is not allowed",
    );
    assert_refused(
        &app("volumes: [{ source: /var/lib/archipelago/../../etc, target: /data }]\n"),
        "volumes[0].source",
        Some("/var/lib/archipelago/../../etc"),
        "may not contain '..'",
    );
}

#[test]
fn absolute_volume_source_outside_the_data_root_is_refused() {
    for outside in [
        "/etc",
        "/var/lib/archipelago2/x",
        "/var/lib/archipelago",
        "/var/lib/archipelago/secrets",
        "/var/lib/archipelago/state/x",
        "/var/lib/archipelago/Not-An-App/x",
    ] {
        let e = err_on(
            check(&app(&format!(
                "volumes: [{{ source: \"{outside}\", target: /data }}]\n"
            ))),
            "volumes[0].source",
        );
        assert_eq!(e.value.as_deref(), Some(outside));
        assert!(
            e.problem
                .contains("inside an app's folder under the data root /var/lib/archipelago"),
            "{e}"
        );
    }
}

#[test]
fn a_volume_source_is_one_folder_of_an_app_folder_never_deeper() {
    // Deeper, a folder on the way could be inside another volume, which a
    // container can swap for a symlink before Podman mounts it.
    for (source, problem) in [
        ("data/sub", "a folder name without '/'"),
        ("./data", "a folder name without '/'"),
        (".", "a folder name without '/'"),
        ("data/", "a folder name without '/'"),
        (
            "/var/lib/archipelago/other/x/y",
            "one folder directly in the app's folder",
        ),
        ("/var/lib/archipelago/other", "one folder directly in the app's folder"),
    ] {
        let e = err_on(
            check(&app(&format!("volumes: [{{ source: \"{source}\", target: /data }}]\n"))),
            "volumes[0].source",
        );
        assert!(e.problem.contains(problem), "{source}: {e}");
    }
}

#[test]
fn data_root_is_configurable() {
    let yaml = app("volumes: [{ source: /srv/archy/app/db, target: /db }]\n");
    assert!(check_in(Path::new("/apps/app"), "/srv/archy", &yaml).is_ok());
    let e = err_on(check(&yaml), "volumes[0].source");
    assert_eq!(e.value.as_deref(), Some("/srv/archy/app/db"));
}

#[test]
fn relative_volume_target_is_refused() {
    assert_refused(
        &app("volumes: [{ source: data, target: data }]\n"),
        "volumes[0].target",
        Some("data"),
        "an absolute path in the container",
    );
}

#[test]
fn volume_target_mounted_twice_is_refused() {
    assert_refused(
        &app("volumes: [{ source: a, target: /data }, { source: b, target: /data/ }]\n"),
        "volumes[1].target",
        Some("/data/"),
        "mounted twice",
    );
}

// ---- env, secrets -------------------------------------------------------------

#[test]
fn env_is_kept_as_a_map() {
    let m = ok(&app("env: { RUST_LOG: info, _X1: \"\" }\n"));
    assert_eq!(m.env.get("RUST_LOG").map(String::as_str), Some("info"));
    assert_eq!(m.env.get("_X1").map(String::as_str), Some(""));
}

#[test]
fn env_key_outside_the_rule_is_refused() {
    assert_refused(
        &app("env: { \"BAD-KEY\": x }\n"),
        "env.BAD-KEY",
        Some("BAD-KEY"),
        "letters, digits and '_'",
    );
    assert_refused(
        &app("env: { \"1X\": x }\n"),
        "env.1X",
        Some("1X"),
        "not starting with a digit",
    );
}

#[test]
fn secret_kinds_are_hex16_and_hex32() {
    let m = ok(&app("secrets: [{ name: a, kind: hex16 }, { name: b, kind: hex32 }]\n"));
    assert_eq!(
        m.secrets,
        [
            SecretSpec {
                name: "a".to_owned(),
                kind: SecretKind::Hex16
            },
            SecretSpec {
                name: "b".to_owned(),
                kind: SecretKind::Hex32
            },
        ]
    );
}

#[test]
fn unknown_secret_kind_is_refused() {
    assert_refused(
        &app("secrets: [{ name: a, kind: base64 }]\n"),
        "secrets[0].kind",
        Some("base64"),
        "allowed: hex16, hex32",
    );
}

#[test]
fn secret_declared_twice_or_badly_named_is_refused() {
    assert_refused(
        &app("secrets: [{ name: a, kind: hex16 }, { name: a, kind: hex16 }]\n"),
        "secrets[1].name",
        Some("a"),
        "declared twice",
    );
    assert_refused(
        &app("secrets: [{ name: Rpc_Pass, kind: hex16 }]\n"),
        "secrets[0].name",
        Some("Rpc_Pass"),
        "lowercase letters",
    );
}

#[test]
fn secret_env_maps_a_variable_to_a_declared_secret() {
    let m = ok(&app(
        "secrets: [{ name: rpc, kind: hex32 }]\nsecret_env: [{ key: RPC_PASSWORD, secret: rpc }]\n",
    ));
    assert_eq!(
        m.secret_env,
        [SecretEnv {
            key: "RPC_PASSWORD".to_owned(),
            secret: "rpc".to_owned()
        }]
    );
}

#[test]
fn secret_env_naming_an_undeclared_secret_is_refused() {
    assert_refused(
        &app("secrets: [{ name: rpc, kind: hex32 }]\nsecret_env: [{ key: PASS, secret: other }]\n"),
        "secret_env[0].secret",
        Some("other"),
        "not declared in `secrets`; declared: [rpc]",
    );
}

#[test]
fn secret_env_key_also_in_env_is_refused() {
    assert_refused(
        &app("env: { PASS: x }\nsecrets: [{ name: rpc, kind: hex32 }]\nsecret_env: [{ key: PASS, secret: rpc }]\n"),
        "secret_env[0].key",
        Some("PASS"),
        "also set in `env`",
    );
}

#[test]
fn secret_env_key_set_twice_is_refused() {
    assert_refused(
        &app("secrets: [{ name: a, kind: hex32 }, { name: b, kind: hex16 }]\nsecret_env: [{ key: PASS, secret: a }, { key: PASS, secret: b }]\n"),
        "secret_env[1].key",
        Some("PASS"),
        "set twice",
    );
}

#[test]
fn secret_env_key_outside_the_rule_is_refused() {
    assert_refused(
        &app("secrets: [{ name: a, kind: hex32 }]\nsecret_env: [{ key: \"A-B\", secret: a }]\n"),
        "secret_env[0].key",
        Some("A-B"),
        "letters, digits and '_'",
    );
}

// ---- resources, security --------------------------------------------------------

#[test]
fn memory_is_parsed_to_bytes() {
    assert_eq!(ok(&app("resources: { memory: 2Gi }\n")).memory, Some(2 << 30));
    assert_eq!(ok(&app("")).memory, None);
}

#[test]
fn bad_memory_is_refused() {
    assert_refused(
        &app("resources: { memory: 2GB }\n"),
        "resources.memory",
        Some("2GB"),
        "such as 512Mi or 2Gi",
    );
    assert_refused(
        &app("resources: { memory: 1Mi }\n"),
        "resources.memory",
        Some("1Mi"),
        "at least 6Mi",
    );
}

#[test]
fn security_defaults_are_read_only_root_and_no_new_privileges() {
    assert_eq!(
        ok(&app("")).security,
        Security {
            capabilities_add: vec![],
            read_only_root: true,
            no_new_privileges: true
        }
    );
    // A security block that sets neither keeps both on.
    let s = ok(&app("security: { capabilities_add: [CHOWN] }\n")).security;
    assert!(s.read_only_root && s.no_new_privileges);
    let off = ok(&app("security: { read_only_root: false, no_new_privileges: false }\n")).security;
    assert!(!off.read_only_root && !off.no_new_privileges);
}

#[test]
fn capability_names_are_upper_cased_without_cap_prefix_and_deduplicated() {
    let m = ok(&app(
        "security: { capabilities_add: [cap_net_bind_service, CAP_CHOWN, Dac_Override, NET_BIND_SERVICE] }\n",
    ));
    assert_eq!(
        m.security.capabilities_add,
        ["NET_BIND_SERVICE", "CHOWN", "DAC_OVERRIDE"]
    );
}

#[test]
fn unknown_capability_is_refused() {
    assert_refused(
        &app("security: { capabilities_add: [CHOWN, CAP_FLY] }\n"),
        "security.capabilities_add[1]",
        Some("CAP_FLY"),
        "Linux capability name",
    );
    assert_refused(
        &app("security: { capabilities_add: [ALL] }\n"),
        "security.capabilities_add[0]",
        Some("ALL"),
        "Linux capability name",
    );
}

// ---- health, stop_grace_period ------------------------------------------------

#[test]
fn health_defaults_are_30s_interval_5s_timeout_3_retries_no_start_period() {
    let h = ok(&app("health: { tcp: { port: 5432 } }\n")).health.expect("health");
    assert_eq!(
        h,
        Health {
            probe: Probe::Tcp { port: 5432 },
            interval: Duration::from_secs(30),
            timeout: Duration::from_secs(5),
            retries: 3,
            start_period: Duration::ZERO,
        }
    );
    assert_eq!(ok(&app("")).health, None);
}

#[test]
fn health_fields_are_parsed() {
    let h = ok(&app(
        "health:\n  exec: [pg_isready, -q]\n  interval: 1m30s\n  timeout: 10s\n  retries: 100\n  start_period: 2m\n",
    ))
    .health
    .expect("health");
    assert_eq!(
        h.probe,
        Probe::Exec {
            command: vec!["pg_isready".to_owned(), "-q".to_owned()]
        }
    );
    assert_eq!(h.interval, Duration::from_secs(90));
    assert_eq!(h.timeout, Duration::from_secs(10));
    assert_eq!(h.retries, 100);
    assert_eq!(h.start_period, Duration::from_secs(120));
}

#[test]
fn http_probe_path_defaults_to_slash_and_full_urls_are_kept() {
    let probe = |yaml: &str| ok(&app(yaml)).health.expect("health").probe;
    assert_eq!(
        probe("health: { http: { port: 80 } }\n"),
        Probe::Http {
            port: 80,
            target: "/".to_owned()
        }
    );
    assert_eq!(
        probe("health: { http: { port: 80, path: \"http://localhost:80/ping\" } }\n"),
        Probe::Http {
            port: 80,
            target: "http://localhost:80/ping".to_owned()
        }
    );
}

#[test]
fn health_with_two_probes_is_refused() {
    assert_refused(
        &app("health: { tcp: { port: 1 }, exec: [true] }\n"),
        "health",
        None,
        "sets 2 probes; allowed: exactly one of http, tcp, exec",
    );
}

#[test]
fn health_with_no_probe_is_refused() {
    assert_refused(
        &app("health: { interval: 10s }\n"),
        "health",
        None,
        "sets 0 probes; allowed: exactly one",
    );
}

#[test]
fn empty_exec_probe_is_refused() {
    assert_refused(
        &app("health: { exec: [] }\n"),
        "health.exec",
        None,
        "must name a command",
    );
}

#[test]
fn http_probe_path_without_slash_or_scheme_is_refused() {
    assert_refused(
        &app("health: { http: { port: 80, path: health } }\n"),
        "health.http.path",
        Some("health"),
        "starting with '/'",
    );
}

#[test]
fn probe_port_out_of_range_is_refused() {
    assert_refused(
        &app("health: { http: { port: 0 } }\n"),
        "health.http.port",
        Some("0"),
        "from 1 to 65535",
    );
    assert_refused(
        &app("health: { tcp: { port: 65536 } }\n"),
        "health.tcp.port",
        Some("65536"),
        "from 1 to 65535",
    );
}

#[test]
fn bad_duration_is_refused() {
    assert_refused(
        &app("health: { tcp: { port: 1 }, interval: soon }\n"),
        "health.interval",
        Some("soon"),
        "such as 30s, 5m or 1m30s",
    );
    assert_refused(
        &app("health: { tcp: { port: 1 }, start_period: 30 }\n"),
        "health.start_period",
        Some("30"),
        "duration",
    );
    assert_refused(
        &app("stop_grace_period: 25h\n"),
        "stop_grace_period",
        Some("25h"),
        "up to 24h",
    );
}

#[test]
fn retries_outside_1_to_100_are_refused() {
    for bad in ["0", "101", "-1"] {
        assert_refused(
            &app(&format!("health: {{ tcp: {{ port: 1 }}, retries: {bad} }}\n")),
            "health.retries",
            Some(bad),
            "from 1 to 100",
        );
    }
}

#[test]
fn zero_interval_and_timeout_longer_than_interval_are_refused() {
    assert_refused(
        &app("health: { tcp: { port: 1 }, interval: 0s }\n"),
        "health.interval",
        Some("0s"),
        "longer than 0s",
    );
    assert_refused(
        &app("health: { tcp: { port: 1 }, interval: 10s, timeout: 20s }\n"),
        "health.timeout",
        Some("20s"),
        "at most the interval",
    );
}

#[test]
fn stop_grace_period_defaults_to_30s() {
    assert_eq!(ok(&app("")).stop_grace_period, Duration::from_secs(30));
    assert_eq!(
        ok(&app("stop_grace_period: 2m\n")).stop_grace_period,
        Duration::from_secs(120)
    );
}

// ---- files ----------------------------------------------------------------

/// An app with a `data` volume, a secret `pw` and `files` as given.
fn with_files(files: &str) -> String {
    app(&format!(
        "volumes: [{{ source: data, target: /data }}]\nsecrets: [{{ name: rpc-pw, kind: hex32 }}]\nfiles:\n{files}"
    ))
}

#[test]
fn files_keep_path_mode_template_and_the_secrets_they_read() {
    let m = ok(&with_files(
        "  - { path: data/a.conf, template: \"pw={{ secrets.rpc_pw }}\" }\n  - { path: data/sub/b.conf, mode: \"0644\", template: \"{{ facts.container }}\" }\n",
    ));
    assert_eq!(m.files.len(), 2);
    assert_eq!(
        (m.files[0].path.as_path(), m.files[0].mode),
        (Path::new("data/a.conf"), 0o600)
    );
    assert_eq!(m.files[0].secrets, ["rpc-pw"]);
    assert_eq!((m.files[1].mode, m.files[1].secrets.len()), (0o644, 0));
}

#[test]
fn file_paths_must_lie_inside_a_named_volume() {
    for bad in ["../x.conf", "/etc/x.conf", "other/x.conf", "data", "data/../x"] {
        assert_refused(
            &with_files(&format!("  - {{ path: \"{bad}\", template: x }}\n")),
            "files[0].path",
            Some(bad),
            "inside one of this app's named volumes [data]",
        );
    }
    assert_refused(
        &with_files("  - { path: data/a, template: x }\n  - { path: data/a, template: y }\n"),
        "files[1].path",
        Some("data/a"),
        "rendered twice",
    );
}

#[test]
fn a_template_naming_an_unknown_secret_or_fact_is_refused() {
    assert_refused(
        &with_files("  - { path: data/a, template: \"{{ secrets.rpc_password }}\" }\n"),
        "files[0].template",
        Some("secrets.rpc_password"),
        "unknown secret (declare it in `secrets`); allowed: [secrets.rpc_pw]",
    );
    assert_refused(
        &with_files("  - { path: data/a, template: \"{{ facts.ip }}\" }\n"),
        "files[0].template",
        Some("facts.ip"),
        "unknown fact; allowed: [facts.app, facts.container",
    );
}

#[test]
fn facts_name_the_containers_of_dependencies_only() {
    let yaml = with_files("  - { path: data/a, template: \"{{ facts.containers.store_db }}\" }\n");
    assert_refused(
        &yaml,
        "files[0].template",
        Some("facts.containers.store_db"),
        "unknown fact",
    );
    ok(&format!("{yaml}depends_on: [store-db]\n"));
}

#[test]
fn a_file_holding_secrets_may_not_be_readable_by_others_and_modes_are_a_short_list() {
    assert_refused(
        &with_files("  - { path: data/a, mode: \"0644\", template: \"{{ secrets.rpc_pw }}\" }\n"),
        "files[0].mode",
        Some("0644"),
        "holds secrets",
    );
    assert_refused(
        &with_files("  - { path: data/a, mode: \"0755\", template: x }\n"),
        "files[0].mode",
        Some("0755"),
        "one of \"0600\"",
    );
}

#[test]
fn every_problem_in_one_manifest_is_reported() {
    let errs = check(&app(
        "kind: daemon\nuser: root\nports: [{ host: 0, container: 80 }]\nresources: { memory: lots }\n",
    ))
    .expect_err("invalid");
    let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(fields, ["kind", "user", "ports[0].host", "resources.memory"]);
    assert!(errs.iter().all(|e| e.file == Path::new("/apps/app/manifest.yml")));
}

#[test]
fn memory_sizes_parse_with_binary_and_decimal_suffixes() {
    assert_eq!(parse_memory("2Gi"), Some(2 << 30));
    assert_eq!(parse_memory("512Mi"), Some(512 << 20));
    assert_eq!(parse_memory("1G"), Some(1_000_000_000));
    assert_eq!(parse_memory("4096"), Some(4096));
    assert_eq!(parse_memory("2GB"), None);
    assert_eq!(parse_memory("Gi"), None);
    assert_eq!(parse_memory("99999999999999Gi"), None);
}

#[test]
fn users_are_numeric() {
    assert!(valid_user("1000"));
    assert!(valid_user("1000:1000"));
    assert!(!valid_user("bitcoin"));
    assert!(!valid_user("1000:"));
}

#[test]
fn relative_paths_may_not_climb() {
    assert!(relative_without_dotdot("ui"));
    assert!(relative_without_dotdot("./ui/sub"));
    assert!(!relative_without_dotdot("../other"));
    assert!(!relative_without_dotdot("ui/../../x"));
    assert!(!relative_without_dotdot("/abs"));
}
