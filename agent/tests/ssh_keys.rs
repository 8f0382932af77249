//! `archy-agent ssh …` as the built binary, as on the node: real
//! `ssh-keygen`, a real `ARCHY-CONF` partition (ext4 on a loop device: this
//! machine's kernel has no vfat), real mounts (root). Each test uses a
//! label of its own, so no test sees another's stick.

use std::fs;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const OWNER: (u32, u32) = (4242, 4243);

/// A data root, an apps folder and an issue file in a temp folder.
struct Node {
    dir: tempfile::TempDir,
    data: PathBuf,
    apps: PathBuf,
    issue: PathBuf,
}

impl Node {
    fn new() -> Node {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let apps = dir.path().join("apps");
        fs::create_dir_all(&data).expect("data");
        fs::create_dir_all(&apps).expect("apps");
        let issue = dir.path().join("run/issue.d/50-archipelago.issue");
        Node { dir, data, apps, issue }
    }

    fn agent(&self, args: &[&str]) -> Output {
        let out = Command::new(env!("CARGO_BIN_EXE_archy-agent"))
            .arg("--data")
            .arg(&self.data)
            .arg("--apps")
            .arg(&self.apps)
            .args(args)
            .output()
            .expect("archy-agent runs");
        eprintln!(
            "archy-agent {args:?}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn prepare(&self, conf_label: &str) -> Output {
        let owner = format!("{}:{}", OWNER.0, OWNER.1);
        let issue = self.issue.to_str().expect("utf8").to_owned();
        self.agent(&[
            "ssh",
            "prepare",
            "--owner",
            &owner,
            "--issue",
            &issue,
            "--conf-label",
            conf_label,
        ])
    }

    fn host_key(&self) -> PathBuf {
        self.data.join("system/ssh/ssh_host_ed25519_key")
    }

    fn authorized_keys(&self) -> PathBuf {
        self.data.join("ssh/authorized_keys")
    }
}

/// A new ed25519 key pair from ssh-keygen: (the .pub line, its fingerprint
/// as `ssh-keygen -l` prints it).
fn new_key(dir: &Path, comment: &str) -> (String, String) {
    let path = dir.join(format!("key-{comment}"));
    run(
        "ssh-keygen",
        &[
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            comment,
            "-f",
            path.to_str().expect("utf8"),
        ],
    );
    let public = format!("{}.pub", path.display());
    let line = fs::read_to_string(&public).expect("pub");
    (line.trim().to_owned(), fingerprint_of(&public))
}

/// `ssh-keygen -lf FILE`'s fingerprint.
fn fingerprint_of(file: &str) -> String {
    let out = run("ssh-keygen", &["-lf", file]);
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)
        .expect("a fingerprint")
        .to_owned()
}

fn run(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).expect("metadata").permissions().mode() & 0o7777
}

fn owner(path: &Path) -> (u32, u32) {
    let md = fs::metadata(path).expect("metadata");
    (md.uid(), md.gid())
}

/// ext4 labels hold 16 bytes.
fn unique_label() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .subsec_nanos();
    format!("SC{:05}{:08x}", std::process::id() % 100_000, nanos)
}

/// An ext4 partition (a whole loop device) labelled `label`, holding
/// `authorized_keys` with `keys` when given. Detached on drop.
struct Stick {
    _dir: tempfile::TempDir,
    device: PathBuf,
}

impl Stick {
    fn new(label: &str, keys: Option<&str>) -> Stick {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("stick.img");
        run("truncate", &["-s", "16M", image.to_str().expect("utf8")]);
        let content = dir.path().join("content");
        fs::create_dir_all(&content).expect("content");
        if let Some(keys) = keys {
            fs::write(content.join("authorized_keys"), keys).expect("keys");
        }
        // mkfs.ext4 -d fills the file system without mounting it.
        run(
            "mkfs.ext4",
            &[
                "-q",
                "-L",
                label,
                "-d",
                content.to_str().expect("utf8"),
                image.to_str().expect("utf8"),
            ],
        );
        let out = run("losetup", &["--find", "--show", image.to_str().expect("utf8")]);
        let device = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Stick { _dir: dir, device }
    }

    /// Whether the device is mounted anywhere.
    fn mounted(&self) -> bool {
        let out = run(
            "lsblk",
            &["-n", "-o", "MOUNTPOINTS", self.device.to_str().expect("utf8")],
        );
        !String::from_utf8_lossy(&out.stdout).trim().is_empty()
    }
}

impl Drop for Stick {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.device).output();
    }
}

/// A service app with a port: not on the console.
fn service_app(apps: &Path) {
    let dir = apps.join("store-db");
    fs::create_dir_all(&dir).expect("app dir");
    fs::write(
        dir.join("manifest.yml"),
        "id: store-db\nname: Store database\nversion: \"16.4\"\n\
         image: docker.io/library/postgres:16.4@sha256:061fced86838b54d645ae7a7fa572763ee892f26cccd2baed6eeb66c8943b301\n\
         ports:\n  - { host: 15432, container: 5432 }\n",
    )
    .expect("manifest");
}

/// A ui app with a port, valid for any data root.
fn ui_app(apps: &Path) {
    let dir = apps.join("web-ui");
    fs::create_dir_all(&dir).expect("app dir");
    fs::write(
        dir.join("manifest.yml"),
        "id: web-ui\nname: Web Wallet\nversion: \"1.0\"\n\
         image: docker.io/library/nginx:1.27@sha256:061fced86838b54d645ae7a7fa572763ee892f26cccd2baed6eeb66c8943b301\n\
         ports:\n  - { host: 18080, container: 80 }\n",
    )
    .expect("manifest");
}

#[test]
fn prepare_makes_the_host_key_once_keeps_it_and_shows_it_on_the_console() {
    let node = Node::new();
    ui_app(&node.apps);
    service_app(&node.apps);
    let out = node.prepare(&unique_label());
    assert!(out.status.success(), "{}", stderr(&out));
    let key = node.host_key();
    let public = format!("{}.pub", key.display());
    assert_eq!(mode(&key), 0o600);
    assert_eq!(mode(&node.data.join("system/ssh")), 0o700);
    assert_eq!(owner(&key), (0, 0));
    let fingerprint = fingerprint_of(&public);
    let private_fingerprint = fingerprint_of(key.to_str().expect("utf8"));
    assert_eq!(fingerprint, private_fingerprint, "the .pub is the key's own half");
    assert!(
        stderr(&out).contains("made this node's ssh host key"),
        "{}",
        stderr(&out)
    );

    let issue = fs::read_to_string(&node.issue).expect("the console text");
    assert!(issue.contains("ssh archipelago@\\4\n"), "{issue}");
    assert!(
        issue.contains(&format!("ssh host key: {fingerprint} (ED25519)\n")),
        "{issue}"
    );
    assert!(issue.contains("Web Wallet: http://\\4:18080\n"), "{issue}");
    assert!(!issue.contains("15432"), "a service app has no web page: {issue}");
    assert!(!issue.contains("problem"), "both manifests load: {issue}");
    assert_eq!(mode(&node.issue), 0o644);
    // The ssh folder is the owner's, even with no key yet.
    assert_eq!(owner(&node.data.join("ssh")), OWNER);
    assert_eq!(mode(&node.data.join("ssh")), 0o700);

    // The next boots keep the key, byte for byte, even with its .pub gone.
    let bytes = fs::read(&key).expect("key");
    fs::remove_file(&public).expect("remove .pub");
    // A manifest that does not load is said, and the ssh setup goes on.
    fs::create_dir_all(node.apps.join("broken")).expect("broken app");
    fs::write(node.apps.join("broken/manifest.yml"), "id: [\n").expect("broken manifest");
    let out = node.prepare(&unique_label());
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        !stderr(&out).contains("made this node's ssh host key"),
        "{}",
        stderr(&out)
    );
    assert_eq!(fs::read(&key).expect("key"), bytes, "the host key was made again");
    assert_eq!(fingerprint_of(&public), fingerprint, "the .pub comes back from the key");
    let issue = fs::read_to_string(&node.issue).expect("the console text");
    assert!(
        issue.contains(&format!("ssh host key: {fingerprint} (ED25519)\n")),
        "{issue}"
    );
    assert!(issue.contains("1 app manifest problem(s)"), "{issue}");
    assert!(stderr(&out).contains("broken/manifest.yml"), "{}", stderr(&out));
}

#[test]
fn keys_on_an_archy_conf_partition_are_imported_once_and_bad_lines_refused_by_number() {
    let node = Node::new();
    let keys = tempfile::tempdir().expect("keys dir");
    let (laptop, laptop_fp) = new_key(keys.path(), "owner@laptop");
    let (phone, phone_fp) = new_key(keys.path(), "owner@phone");
    let (optioned, _) = new_key(keys.path(), "restricted");
    let text = format!(
        "# the owner's keys\n{laptop}\ncommand=\"/bin/sh\" {optioned}\nssh-dss AAAAB3NzaC1kc3MAAACBAP\n\n{phone}\n{laptop}\n"
    );
    let label = unique_label();
    let stick = Stick::new(&label, Some(&text));

    let out = node.prepare(&label);
    assert!(out.status.success(), "{}", stderr(&out));
    let said = stderr(&out);
    assert!(
        said.contains(&format!("line 2: imported {laptop_fp} (ED25519) owner@laptop")),
        "{said}"
    );
    assert!(
        said.contains(&format!("line 6: imported {phone_fp} (ED25519) owner@phone")),
        "{said}"
    );
    assert!(said.contains("line 3: \"command\" is not a key type"), "{said}");
    assert!(said.contains("line 4: \"ssh-dss\" keys are not accepted"), "{said}");
    assert!(said.contains("line 7: already authorized"), "{said}");
    for key in [&laptop, &phone, &optioned] {
        let data = key.split(' ').nth(1).expect("key data");
        assert!(!said.contains(data), "the key material is never logged: {said}");
    }
    assert!(!stick.mounted(), "the stick is unmounted after the import");

    let file = node.authorized_keys();
    assert_eq!(fs::read_to_string(&file).expect("keys"), format!("{laptop}\n{phone}\n"));
    assert_eq!(owner(&file), OWNER);
    assert_eq!(mode(&file), 0o600);
    assert_eq!(owner(&node.data.join("ssh")), OWNER);
    assert_eq!(mode(&node.data.join("ssh")), 0o700);

    // Every boot imports again: nothing twice, and a key added since stays.
    let (added, added_fp) = new_key(keys.path(), "added-later");
    fs::write(&file, format!("{laptop}\n{phone}\n{added}\n")).expect("add by hand");
    let out = node.prepare(&label);
    assert!(out.status.success());
    assert!(stderr(&out).contains("line 2: already authorized"), "{}", stderr(&out));
    assert_eq!(
        fs::read_to_string(&file).expect("keys"),
        format!("{laptop}\n{phone}\n{added}\n")
    );
    let listed = node.agent(&["ssh", "list-keys", "--json"]);
    assert!(listed.status.success());
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).expect("json");
    let fps: Vec<&str> = listed
        .as_array()
        .expect("array")
        .iter()
        .map(|k| k["fingerprint"].as_str().expect("fingerprint"))
        .collect();
    assert_eq!(fps, [&laptop_fp, &phone_fp, &added_fp]);
}

#[test]
fn a_stick_without_the_file_and_a_hand_broken_key_file_change_nothing() {
    let node = Node::new();
    let label = unique_label();
    let _empty = Stick::new(&label, None);
    let out = node.prepare(&label);
    assert!(out.status.success());
    assert!(stderr(&out).contains("holds no authorized_keys"), "{}", stderr(&out));
    assert!(!node.authorized_keys().exists());

    // A line the node does not accept in its own file: the file is left
    // as it is, the error names it, and the boot goes on.
    let keys = tempfile::tempdir().expect("keys dir");
    let (good, _) = new_key(keys.path(), "good");
    let broken = format!("{good}\nssh-ed25519 AAAA-broken\n");
    fs::create_dir_all(node.data.join("ssh")).expect("ssh dir");
    fs::write(node.authorized_keys(), &broken).expect("hand-edited");
    let label = unique_label();
    let (other, _) = new_key(keys.path(), "other");
    let _stick = Stick::new(&label, Some(&format!("{other}\n")));
    let out = node.prepare(&label);
    assert!(
        out.status.success(),
        "the host key and console text do not depend on it"
    );
    let said = stderr(&out);
    assert!(
        said.contains(&format!(
            "{}: a line is not accepted:\n  line 2:",
            node.authorized_keys().display()
        )),
        "{said}"
    );
    assert_eq!(fs::read_to_string(node.authorized_keys()).expect("kept"), broken);
    assert!(fs::read_to_string(&node.issue)
        .expect("issue")
        .contains("ssh host key: SHA256:"));
}

#[test]
fn keys_are_added_listed_and_removed_by_fingerprint() {
    let node = Node::new();
    let keys = tempfile::tempdir().expect("keys dir");
    let (first, first_fp) = new_key(keys.path(), "first");
    let (second, second_fp) = new_key(keys.path(), "second");

    // The words of a .pub line, unquoted.
    let words: Vec<&str> = first.split(' ').collect();
    let mut args = vec!["ssh", "add-key"];
    args.extend(&words);
    let out = node.agent(&args);
    assert!(out.status.success());
    assert_eq!(stdout(&out), format!("added {first_fp} (ED25519) first\n"));
    // Again: nothing twice.
    let out = node.agent(&["ssh", "add-key", &first]);
    assert!(out.status.success());
    assert!(stdout(&out).starts_with("already authorized"), "{}", stdout(&out));
    let pub_file = keys.path().join("key-second.pub");
    let out = node.agent(&["ssh", "add-key", "--file", pub_file.to_str().expect("utf8")]);
    assert!(out.status.success());
    let file = node.authorized_keys();
    assert_eq!(fs::read_to_string(&file).expect("keys"), format!("{first}\n{second}\n"));
    assert_eq!(mode(&file), 0o600);
    // Owned as the data root is (root here; the agent's user on a node).
    assert_eq!(owner(&file), owner(&node.data));

    let out = node.agent(&["ssh", "list-keys"]);
    assert!(out.status.success());
    let table = stdout(&out);
    assert!(table.starts_with("FINGERPRINT"), "{table}");
    assert!(table.contains(&format!("{first_fp}  ED25519  first")), "{table}");

    // A bad key: refused with the line and why, nothing written.
    let out = node.agent(&["ssh", "add-key", "ssh-ed25519", "AAAAnotakey"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("the key given: a line is not accepted:\n  line 1: the key data is"),
        "{}",
        stderr(&out)
    );
    let bad_file = keys.path().join("bad.keys");
    fs::write(&bad_file, format!("{second}\nno-pty {first}\n")).expect("bad file");
    let out = node.agent(&["ssh", "add-key", "--file", bad_file.to_str().expect("utf8")]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(&format!(
            "{}: a line is not accepted:\n  line 2: \"no-pty\"",
            bad_file.display()
        )),
        "{}",
        stderr(&out)
    );
    assert_eq!(fs::read_to_string(&file).expect("keys"), format!("{first}\n{second}\n"));

    // Remove by fingerprint, with or without its prefix; never the last
    // one without --last; an unknown one names the keys there.
    let out = node.agent(&["ssh", "remove-key", "SHA256:nosuchkey"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains(&first_fp) && stderr(&out).contains(&second_fp));
    let out = node.agent(&["ssh", "remove-key", first_fp.trim_start_matches("SHA256:")]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(fs::read_to_string(&file).expect("keys"), format!("{second}\n"));
    let out = node.agent(&["ssh", "remove-key", &second_fp]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("is the last key"), "{}", stderr(&out));
    assert_eq!(fs::read_to_string(&file).expect("keys"), format!("{second}\n"));
    let out = node.agent(&["ssh", "remove-key", &second_fp, "--last"]);
    assert!(out.status.success());
    assert_eq!(fs::read_to_string(&file).expect("keys"), "");
}

#[test]
fn a_user_adds_keys_to_a_data_root_it_owns() {
    // As the node's archipelago user would: not root, the data root its own.
    let node = Node::new();
    let nobody = (65534u32, 65534u32);
    for dir in [node.dir.path(), &node.data] {
        std::os::unix::fs::chown(dir, Some(nobody.0), Some(nobody.1)).expect("chown");
    }
    let keys = tempfile::tempdir().expect("keys dir");
    let (key, fp) = new_key(keys.path(), "mine");
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_archy-agent"))
        .arg("--data")
        .arg(&node.data)
        .args(["ssh", "add-key", &key])
        .output()
        .expect("setpriv");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains(&fp));
    assert_eq!(owner(&node.authorized_keys()), nobody);
    assert_eq!(owner(&node.data.join("ssh")), nobody);
}

/// The CLI's engine without flags: root's socket for root, the user's own
/// rootless one for anyone else; ARCHY_ENGINE still wins.
#[test]
fn the_default_engine_socket_follows_the_user() {
    let agent = |uid: Option<u32>, engine: Option<&str>| {
        let mut command = match uid {
            Some(uid) => {
                let mut c = Command::new("setpriv");
                c.args([
                    format!("--reuid={uid}"),
                    format!("--regid={uid}"),
                    "--clear-groups".into(),
                ])
                .arg(env!("CARGO_BIN_EXE_archy-agent"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_archy-agent")),
        };
        command.env_remove("ARCHY_ENGINE");
        if let Some(engine) = engine {
            command.env("ARCHY_ENGINE", engine);
        }
        // Straight to the engine, never through an agent.
        let out = command
            .args(["--data", "/nonexistent", "logs", "x", "--all"])
            .output()
            .expect("archy-agent");
        assert!(!out.status.success());
        stderr(&out)
    };
    let said = agent(Some(65534), None);
    assert!(said.contains("/run/user/65534/podman/podman.sock"), "{said}");
    let said = agent(None, Some("/nonexistent/engine.sock"));
    assert!(said.contains("/nonexistent/engine.sock"), "{said}");
    let said = agent(Some(65534), Some("/nonexistent/engine.sock"));
    assert!(said.contains("/nonexistent/engine.sock"), "{said}");
}
