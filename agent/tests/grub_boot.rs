//! Boot counting in GRUB itself: `grub-emu` (package grub-emu) runs the
//! installed `grub.cfg` again and again against a loop disk with the real
//! layout, reading and writing the two boot environment copies on its
//! ESP (FAT, through mtools), as the firmware's GRUB would (`$root` is
//! the ESP). grub-emu cannot load a kernel, so `linux` and `initrd` are
//! turned into `echo`; GRUB then falls back entry after entry to the
//! restart entry, whose `reboot` ends grub-emu. The rest (loading both
//! copies, the checks, the counting, `save_env` into the older copy, the
//! PARTUUID check with `probe`, `live/bootargs`) runs as written.
//!
//! Every run is also put to the pure model, `bootenv::grub_boot`: it must
//! name the same entries and write the same bytes into the same copy.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use archy_agent::os::bootenv::{self, BootEnv, EnvStore, SlotName};
use archy_agent::os::disks::Content;
use archy_agent::os::grub::{self, BootConfig, PartUuid};
use archy_agent::os::layout::{self, Part, GIB};
use archy_agent::os::machine_id::MachineId;
use archy_agent::os::partition::{self, Consent};

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn run(program: &str, args: &[&str]) -> std::process::Output {
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

/// A loop disk with the installed layout, and GRUB's view of it.
struct Machine {
    dir: tempfile::TempDir,
    device: PathBuf,
    esp: PathBuf,
    cfg: BootConfig,
    map: PathBuf,
}

impl Drop for Machine {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}

/// One GRUB run: the entries it tried (their whole kernel lines), and
/// whether it went on to the restart entry.
#[derive(Debug)]
struct Run {
    lines: Vec<String>,
    restarted: bool,
    saved_msgs: Vec<String>,
    /// The degraded entry said so before anything else.
    degraded_said: bool,
}

impl Machine {
    fn new() -> Machine {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("disk.img");
        run("truncate", &["-s", "16G", path(&image)]);
        let out = run("losetup", &["--find", "--show", "-P", path(&image)]);
        let device = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        let plan = layout::plan(16 * GIB, 0).expect("plan");
        let consent = Consent::unattended(&device, Content::Blank, plan).expect("consent");
        let parts = partition::write(&consent).expect("layout");
        let uuid = |p: Part| PartUuid::parse(&parts[(p.number() - 1) as usize].partuuid).expect("partuuid");
        let cfg = BootConfig {
            esp: uuid(Part::Esp),
            slot_a: uuid(Part::SlotA),
            slot_b: uuid(Part::SlotB),
            data: uuid(Part::Data),
            machine_id: MachineId::random().expect("machine-id"),
        };
        let esp = PathBuf::from(format!("{}p{}", device.display(), Part::Esp.number()));
        run("mmd", &["-i", path(&esp), "::/grub"]);
        let map = dir.path().join("device.map");
        fs::write(&map, format!("(hd0) {}\n", device.display())).expect("device.map");
        Machine {
            dir,
            device,
            esp,
            cfg,
            map,
        }
    }

    fn slot_node(&self, s: SlotName) -> String {
        let part = match s {
            SlotName::A => Part::SlotA,
            SlotName::B => Part::SlotB,
        };
        format!("{}p{}", self.device.display(), part.number())
    }

    /// Puts a file onto the ESP's `grub/`, or removes it (`None`).
    fn put(&self, name: &str, bytes: Option<&[u8]>) {
        let target = format!("::/grub/{name}");
        match bytes {
            Some(b) => {
                let file = self.dir.path().join(name);
                fs::write(&file, b).expect("write");
                run("mcopy", &["-o", "-i", path(&self.esp), path(&file), &target]);
            }
            None => {
                let _ = Command::new("mdel").args(["-i", path(&self.esp), &target]).output();
            }
        }
    }

    fn get(&self, name: &str) -> Option<Vec<u8>> {
        let file = self.dir.path().join(format!("{name}.read"));
        let _ = fs::remove_file(&file);
        let out = Command::new("mcopy")
            .args(["-o", "-i", path(&self.esp), &format!("::/grub/{name}"), path(&file)])
            .output()
            .expect("mcopy (package mtools)");
        out.status.success().then(|| fs::read(&file).expect("read"))
    }

    fn copies(&self) -> [Option<Vec<u8>>; 2] {
        [self.get(bootenv::COPIES[0]), self.get(bootenv::COPIES[1])]
    }

    fn set_copies(&self, copies: &[Option<Vec<u8>>; 2]) {
        for (i, c) in copies.iter().enumerate() {
            self.put(bootenv::COPIES[i], c.as_deref());
        }
    }

    /// Runs GRUB once on the ESP with `cfg_text` (the installed grub.cfg).
    fn boot(&self, cfg_text: &str) -> Run {
        let text: String = cfg_text
            .replace("set timeout=1\n", "set timeout=0\n")
            .replace("sleep 30", "sleep 1")
            .replace("        initrd (", "        echo INITRD (")
            .lines()
            .map(|l| {
                if let Some(rest) = l.strip_prefix("        linux (") {
                    format!("        echo LINUX ({rest} LINE-END\n")
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        self.put("grub.cfg", Some(text.as_bytes()));
        let out = Command::new("timeout")
            .args([
                "120",
                "grub-emu",
                "-m",
                path(&self.map),
                "-r",
                "hd0,gpt2",
                "-d",
                "/grub",
            ])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("grub-emu (package grub-emu)");
        // The restart entry's `reboot` ends grub-emu: nothing waited for a key.
        assert!(out.status.success(), "grub-emu ended with {}", out.status);
        let clean = screen(&String::from_utf8_lossy(&out.stdout));
        let mut lines = Vec::new();
        for l in clean.lines() {
            if let Some(p) = l.find("LINUX (") {
                let rest = &l[p + "LINUX ".len()..];
                let end = rest
                    .find(" LINE-END")
                    .unwrap_or_else(|| panic!("an unterminated kernel line in {clean}"));
                lines.push(rest[..end].to_owned());
            } else if l.contains("Archipelago: partition") {
                lines.push("WRONG-PARTUUID".to_owned());
            }
        }
        let saved = "Archipelago: boot environment saved in bootenv.";
        let failed = "Archipelago: the boot environment cannot be saved";
        let saved_msgs = clean
            .match_indices(saved)
            .map(|(p, _)| clean[p..p + saved.len() + 1].to_owned())
            .chain(clean.contains(failed).then(|| failed.to_owned()))
            .collect();
        let degraded_said = clean
            .lines()
            .find(|l| l.contains("LINUX (") || l.contains("DEGRADED boot"))
            .is_some_and(|l| l.contains("DEGRADED boot"));
        Run {
            degraded_said,
            lines,
            restarted: clean.contains("no system slot could be booted"),
            saved_msgs,
        }
    }

    /// The kernel line GRUB echoes for an entry.
    fn line(&self, e: bootenv::Entry, args: &str) -> String {
        let (gpt, uuid) = match e.slot {
            SlotName::A => (Part::SlotA.number(), &self.cfg.slot_a),
            SlotName::B => (Part::SlotB.number(), &self.cfg.slot_b),
        };
        let mut l = format!(
            "(hd0,gpt{gpt})/live/vmlinuz {}",
            grub::kernel_args(&self.cfg, e.slot.lower(), uuid)
        );
        if e.degraded {
            l.push_str(" archipelago.degraded=1");
        }
        if !args.is_empty() {
            l.push(' ');
            l.push_str(args);
        }
        l
    }

    /// One boot: GRUB and the model agree on the entries and on what was
    /// written where; returns the model's answer.
    fn step(&self, text: &str, args: &dyn Fn(SlotName) -> String) -> bootenv::GrubBoot {
        let before = self.copies();
        let model = bootenv::grub_boot([before[0].as_deref(), before[1].as_deref()]);
        let got = self.boot(text);
        let after = self.copies();
        let want: Vec<String> = [model.boot, model.fallback]
            .iter()
            .map(|e| self.line(*e, &args(e.slot)))
            .collect();
        assert_eq!(got.lines, want, "GRUB's entries vs the model's");
        assert!(got.restarted, "GRUB went on to the restart entry");
        assert_eq!(
            got.degraded_said, model.boot.degraded,
            "the console says a degraded boot exactly when it is one"
        );
        let mut expected = before.clone();
        if let Some((i, bytes)) = &model.written {
            expected[*i] = Some(bytes.clone());
            assert_eq!(
                got.saved_msgs,
                [format!("Archipelago: boot environment saved in bootenv.{i}")]
            );
        } else {
            assert!(
                got.saved_msgs.iter().all(|m| m.contains("cannot be saved")),
                "{:?}",
                got.saved_msgs
            );
        }
        for i in 0..2 {
            assert!(
                after[i] == expected[i],
                "copy {i} after GRUB:\n{}\nthe model's:\n{}",
                show(&after[i]),
                show(&expected[i])
            );
        }
        model
    }
}

/// The screen's text, without escape sequences, each line whole: GRUB
/// wraps after column 79 (the cursor positions of `ESC [ row ; col H`
/// are followed to know where a line was cut).
fn screen(raw: &str) -> String {
    let mut out = String::new();
    let mut col = 0usize;
    let mut widest = 0usize;
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                let mut seq = String::new();
                for d in chars.by_ref() {
                    seq.push(d);
                    if d.is_ascii_alphabetic() {
                        break;
                    }
                }
                if let Some(params) = seq.strip_prefix('[').and_then(|s| s.strip_suffix('H')) {
                    col = params
                        .split(';')
                        .nth(1)
                        .and_then(|c| c.parse::<usize>().ok())
                        .map_or(0, |c| c.saturating_sub(1));
                    out.push(' ');
                }
            }
            '\r' => col = 0,
            '\n' => {
                if widest < 79 {
                    out.push('\n');
                }
                col = 0;
                widest = 0;
            }
            c => {
                out.push(c);
                col += 1;
                widest = widest.max(col);
            }
        }
    }
    out
}

fn show(c: &Option<Vec<u8>>) -> String {
    match c {
        Some(b) => String::from_utf8_lossy(&b[..b.len().min(220)]).into_owned(),
        None => "(none)".to_owned(),
    }
}

/// The copies a Linux writer (EnvStore) makes: init, then `change`.
fn linux_copies(change: impl FnOnce(&EnvStore)) -> [Option<Vec<u8>>; 2] {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EnvStore::new(dir.path().to_owned());
    store.init().expect("init");
    change(&store);
    [0, 1].map(|i| Some(fs::read(store.copy_path(i)).expect("copy")))
}

fn rauc(store: &EnvStore, args: &[&str]) {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    bootenv::rauc_backend(&args, store, Some(SlotName::A)).expect("rauc backend");
}

fn env_of(c: &Option<Vec<u8>>) -> BootEnv {
    bootenv::decode(c.as_deref().expect("a copy")).expect("a valid copy")
}

fn state(copies: &[Option<Vec<u8>>; 2]) -> BootEnv {
    let d = copies.clone().map(|c| c.and_then(|b| bootenv::decode(&b).ok()));
    let i = bootenv::newer([d[0].as_ref(), d[1].as_ref()]).expect("a valid copy");
    d[i].expect("decoded")
}

fn no_args(_: SlotName) -> String {
    String::new()
}

#[test]
fn grub_counts_a_trial_in_both_copies_and_agrees_with_the_model() {
    let m = Machine::new();
    let text = grub::render_cfg(&m.cfg);
    let entry = |slot, degraded| bootenv::Entry { slot, degraded };

    // A fresh install: A, committed, never counted, nothing written.
    let fresh = linux_copies(|_| {});
    m.set_copies(&fresh);
    for _ in 0..2 {
        let r = m.step(&text, &no_args);
        assert_eq!(
            (r.boot, r.fallback),
            (entry(SlotName::A, false), entry(SlotName::B, true))
        );
        assert_eq!(r.written, None);
    }
    assert_eq!(m.copies(), fresh, "a committed slot's boot writes nothing");

    // RAUC installed into B: set-state B bad, then set-primary B.
    let trial = linux_copies(|s| {
        rauc(s, &["set-state", "B", "bad"]);
        rauc(s, &["set-primary", "B"]);
    });
    m.set_copies(&trial);
    let mut written = Vec::new();
    for try_ in 1..=3u8 {
        let r = m.step(&text, &no_args);
        assert_eq!(r.boot, entry(SlotName::B, false), "try {try_}");
        assert_eq!(r.fallback, entry(SlotName::A, false));
        let (i, _) = r.written.clone().expect("a counted boot is saved");
        written.push(i);
        let env = state(&m.copies());
        assert_eq!(env.b.tries, try_);
        assert!(env.b.ok && env.b.trial);
    }
    // Each save goes to the copy not read: they alternate.
    assert_eq!(written, [0, 1, 0]);
    // The fourth boot: B used its tries, A (committed) boots.
    let r = m.step(&text, &no_args);
    assert_eq!(
        (r.boot, r.fallback),
        (entry(SlotName::A, false), entry(SlotName::B, true))
    );
    assert_eq!(r.written.as_ref().map(|w| w.0), Some(1));
    let env = state(&m.copies());
    assert!(!env.b.ok && env.b.trial, "B_OK=0 B_TRIAL=1: {env:?}");
    assert_eq!(env.b.tries, 3);
    assert_eq!(env.committed, SlotName::A);
    // Then A again, uncounted, nothing written.
    let before = m.copies();
    let r = m.step(&text, &no_args);
    assert_eq!(r.boot, entry(SlotName::A, false));
    assert_eq!(m.copies(), before);

    // Committed B first (after a good update): B, uncounted, A the fallback.
    let committed_b = linux_copies(|s| {
        rauc(s, &["set-primary", "B"]);
        rauc(s, &["set-state", "B", "good"]);
    });
    m.set_copies(&committed_b);
    let r = m.step(&text, &no_args);
    assert_eq!(
        (r.boot, r.fallback),
        (entry(SlotName::B, false), entry(SlotName::A, false))
    );
    assert_eq!(m.copies(), committed_b);

    // Neither slot ok: COMMITTED (B) degraded, then A degraded.
    let none_ok = linux_copies(|s| {
        rauc(s, &["set-primary", "B"]);
        rauc(s, &["set-state", "B", "good"]);
        rauc(s, &["set-state", "B", "bad"]);
        rauc(s, &["set-state", "A", "bad"]);
    });
    m.set_copies(&none_ok);
    let r = m.step(&text, &no_args);
    assert_eq!(
        (r.boot, r.fallback),
        (entry(SlotName::B, true), entry(SlotName::A, true))
    );
    assert_eq!(r.written, None);
}

#[test]
fn grub_reads_around_a_damaged_copy_and_boots_degraded_without_one() {
    let m = Machine::new();
    let text = grub::render_cfg(&m.cfg);
    let entry = |slot, degraded| bootenv::Entry { slot, degraded };
    let trial = linux_copies(|s| {
        rauc(s, &["set-state", "B", "bad"]);
        rauc(s, &["set-primary", "B"]);
    });
    let n = {
        let d = trial.clone().map(|c| c.and_then(|b| bootenv::decode(&b).ok()));
        bootenv::newer([d[0].as_ref(), d[1].as_ref()]).expect("valid")
    };
    let o = 1 - n;
    assert!(env_of(&trial[n]).b.trial);

    // The older copy, with a GRUB block but damaged values (a bit flip,
    // a torn sector whose ARCHY_END is not ARCHY_SEQ): the newer one is
    // used and GRUB saves into the damaged one, repairing it.
    let seq_o = env_of(&trial[o]).seq;
    let torn = (format!("ARCHY_END={seq_o}"), format!("ARCHY_END={}", (seq_o + 1) % 3));
    for damage in [("A_OK=1".to_owned(), "A_OK=7".to_owned()), torn] {
        let mut copies = trial.clone();
        let older = String::from_utf8(copies[o].clone().expect("older")).expect("ascii");
        assert!(older.contains(&damage.0), "{older}");
        copies[o] = Some(older.replacen(&damage.0, &damage.1, 1).into_bytes());
        assert!(bootenv::decode(copies[o].as_deref().expect("copy")).is_err());
        m.set_copies(&copies);
        let r = m.step(&text, &no_args);
        assert_eq!(r.boot, entry(SlotName::B, false));
        assert_eq!(r.written.as_ref().map(|w| w.0), Some(o), "{damage:?}");
        let after = m.copies();
        assert_eq!(env_of(&after[o]).b.tries, 1);
        assert_eq!(after[n], copies[n], "the copy read is untouched");
    }

    // The newer copy garbage or cut short: the older one is used; GRUB
    // cannot write a file without a GRUB block (save_env refuses it), so
    // it saves into the copy it read, in place.
    let garbage: Vec<u8> = (0..1024u32).map(|i| (i * 7919 % 251) as u8).collect();
    let short = trial[n].as_deref().expect("newer")[..40].to_vec();
    for bad in [garbage.clone(), short] {
        let mut copies = trial.clone();
        copies[n] = Some(bad.clone());
        m.set_copies(&copies);
        let r = m.step(&text, &no_args);
        // The older copy: B marked bad, not yet primary: A boots.
        assert_eq!(r.boot, entry(SlotName::A, false));
        assert_eq!(r.written, None);
        // The trial in the readable copy, the other one damaged.
        copies[o] = trial[n].clone();
        m.set_copies(&copies);
        let r = m.step(&text, &no_args);
        assert_eq!(r.boot, entry(SlotName::B, false));
        assert_eq!(r.written.as_ref().map(|w| w.0), Some(o));
        let after = m.copies();
        assert_eq!(after[n].as_deref(), Some(bad.as_slice()));
        assert_eq!(env_of(&after[o]).b.tries, 1);
    }

    // A missing copy is as a damaged one.
    let mut copies = trial.clone();
    copies[o] = None;
    m.set_copies(&copies);
    let r = m.step(&text, &no_args);
    assert_eq!(r.boot, entry(SlotName::B, false));
    assert_eq!(
        r.written.as_ref().map(|w| w.0),
        Some(n),
        "the missing one cannot be written"
    );

    // A trial whose count no copy can take (the only copy readable but
    // without GRUB's free-space marker at its end) is not booted:
    // COMMITTED, degraded.
    let mut unwritable = trial[n].clone().expect("newer");
    unwritable[bootenv::BLOCK_SIZE - 1] = b'X';
    m.set_copies(&[Some(unwritable), None]);
    let r = m.step(&text, &no_args);
    assert_eq!(
        (r.boot, r.fallback),
        (entry(SlotName::A, true), entry(SlotName::B, true))
    );
    assert_eq!(r.written, None);

    // Both copies unreadable: A degraded, then B degraded; nothing written.
    for copies in [[Some(garbage.clone()), Some(garbage.clone())], [None, None]] {
        m.set_copies(&copies);
        let r = m.step(&text, &no_args);
        assert_eq!(
            (r.boot, r.fallback),
            (entry(SlotName::A, true), entry(SlotName::B, true))
        );
    }
}

#[test]
fn grub_appends_a_release_s_bootargs_and_checks_partuuids() {
    let m = Machine::new();
    let text = grub::render_cfg(&m.cfg);
    let entry = |slot, degraded| bootenv::Entry { slot, degraded };
    // Slot B holds live/bootargs (debugfs writes it into the ext4 slot).
    let words = "archipelago.trial_deadline=60 archipelago.test.unhealthy";
    let file = m.dir.path().join("bootargs");
    fs::write(&file, bootenv::encode_bootargs(words).expect("bootargs")).expect("write");
    let node = m.slot_node(SlotName::B);
    run("debugfs", &["-w", "-R", "mkdir live", &node]);
    run(
        "debugfs",
        &["-w", "-R", &format!("write {} live/bootargs", path(&file)), &node],
    );
    let args = |s: SlotName| {
        if s == SlotName::B {
            words.to_owned()
        } else {
            String::new()
        }
    };
    let trial = linux_copies(|s| {
        rauc(s, &["set-state", "B", "bad"]);
        rauc(s, &["set-primary", "B"]);
    });
    m.set_copies(&trial);
    let r = m.step(&text, &args);
    assert_eq!(
        (r.boot, r.fallback),
        (entry(SlotName::B, false), entry(SlotName::A, false))
    );

    // A partition 4 that is not slot B's PARTUUID is never booted.
    let other = PartUuid::parse("00000000-0000-4000-8000-000000000000").expect("uuid");
    let wrong = grub::render_cfg(&BootConfig {
        slot_b: other,
        ..m.cfg.clone()
    });
    m.set_copies(&trial);
    let got = m.boot(&wrong);
    assert_eq!(
        got.lines,
        ["WRONG-PARTUUID".to_owned(), m.line(entry(SlotName::A, false), "")]
    );
}

/// `archy-agent os rauc-backend`, as RAUC runs it: arguments in, the
/// answer on stdout, a non-zero exit and a reason on stderr otherwise.
#[test]
fn rauc_backend_runs_as_a_process() {
    let dir = tempfile::tempdir().expect("tempdir");
    let grub = dir.path().join("grub");
    fs::create_dir(&grub).expect("mkdir");
    EnvStore::new(grub.clone()).init().expect("init");
    let cmdline = dir.path().join("cmdline");
    fs::write(&cmdline, "boot=live archipelago.slot=a rauc.slot=A quiet\n").expect("cmdline");
    let backend = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_archy-agent"))
            .args(["os", "rauc-backend", "--env-dir"])
            .arg(&grub)
            .arg("--cmdline")
            .arg(&cmdline)
            .args(args)
            .output()
            .expect("archy-agent")
    };
    let ok = |args: &[&str]| {
        let out = backend(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(ok(&["get-primary"]), "A\n");
    assert_eq!(ok(&["get-current"]), "A\n");
    assert_eq!(ok(&["get-state", "B"]), "bad\n");
    // An install into B, as RAUC 1.8 does it.
    assert_eq!(ok(&["set-state", "B", "bad"]), "");
    assert_eq!(ok(&["set-primary", "B"]), "");
    assert_eq!(ok(&["get-primary"]), "B\n");
    let env = EnvStore::new(grub.clone()).read().expect("read");
    assert!(env.b.ok && env.b.trial && env.b.tries == 0 && env.committed == SlotName::A);
    // mark-good on B.
    assert_eq!(ok(&["set-state", "B", "good"]), "");
    let env = EnvStore::new(grub.clone()).read().expect("read");
    assert!(!env.b.trial && env.committed == SlotName::B);

    let out = backend(&["set-state", "C", "good"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("\"C\"") && err.contains("A or B"), "{err}");
    assert!(out.stdout.is_empty());
    // No readable copy: an error naming both files.
    fs::write(grub.join("bootenv.0"), "junk").expect("write");
    fs::remove_file(grub.join("bootenv.1")).expect("rm");
    let out = backend(&["get-primary"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bootenv.0") && err.contains("bootenv.1"), "{err}");
}

/// Processes stopped when the test ends, by their own ids: a forked
/// daemon's pid and children of the test.
struct Reap(Vec<u32>, Vec<std::process::Child>);

impl Drop for Reap {
    fn drop(&mut self) {
        for child in &mut self.1 {
            let _ = child.kill();
            let _ = child.wait();
        }
        for pid in &self.0 {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
    }
}

/// RAUC 1.8 itself (`rauc service` on a private D-Bus system bus, package
/// rauc) with `bootloader=custom` calls `archy-agent os rauc-backend`:
/// `rauc status` reads the primary and the states through it, and
/// `mark-active`, `mark-bad`, `mark-good` change the boot environment.
#[test]
fn rauc_1_8_drives_the_backend() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let grub = d.join("grub");
    fs::create_dir(&grub).expect("mkdir");
    let store = EnvStore::new(grub.clone());
    store.init().expect("init");
    let calls = d.join("calls");
    let backend = d.join("backend");
    fs::write(
        &backend,
        format!(
            "#!/bin/sh\necho \"$@\" >> {calls}\nexec {bin} os rauc-backend --env-dir {grub} \"$@\"\n",
            calls = path(&calls),
            bin = env!("CARGO_BIN_EXE_archy-agent"),
            grub = path(&grub),
        ),
    )
    .expect("backend");
    run("chmod", &["0755", path(&backend)]);
    for img in ["a.img", "b.img"] {
        run("truncate", &["-s", "8M", path(&d.join(img))]);
    }
    fs::write(d.join("keyring.pem"), "").expect("keyring");
    let conf = d.join("system.conf");
    fs::write(
        &conf,
        format!(
            "[system]\ncompatible=archipelago-amd64\nbootloader=custom\nstatusfile={d}/rauc.status\n\
             [keyring]\npath={d}/keyring.pem\n[handlers]\nbootloader-custom-backend={backend}\n\
             [slot.rootfs.0]\ndevice={d}/a.img\ntype=ext4\nbootname=A\n\
             [slot.rootfs.1]\ndevice={d}/b.img\ntype=ext4\nbootname=B\n",
            d = path(d),
            backend = path(&backend),
        ),
    )
    .expect("system.conf");
    let bus = d.join("bus");
    let bus_conf = d.join("bus.conf");
    fs::write(
        &bus_conf,
        format!(
            "<!DOCTYPE busconfig PUBLIC \"-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN\" \
             \"http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd\">\n<busconfig><type>system</type>\
             <listen>unix:path={}</listen><auth>EXTERNAL</auth><policy context=\"default\">\
             <allow user=\"*\"/><allow own=\"*\"/><allow send_destination=\"*\"/>\
             <allow receive_sender=\"*\"/></policy></busconfig>\n",
            path(&bus)
        ),
    )
    .expect("bus.conf");
    let out = Command::new("dbus-daemon")
        .args(["--fork", "--print-pid", "--config-file"])
        .arg(&bus_conf)
        .output()
        .expect("dbus-daemon (package dbus)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let dbus_pid: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().expect("dbus pid");
    let mut reap = Reap(vec![dbus_pid], Vec::new());
    let address = format!("unix:path={}", path(&bus));
    let log = fs::File::create(d.join("service.log")).expect("log");
    let service = Command::new("rauc")
        .arg("service")
        .arg(format!("--conf={}", path(&conf)))
        .arg("--override-boot-slot=A")
        .arg(format!("--mount={}", path(&d.join("mnt"))))
        .env("DBUS_SYSTEM_BUS_ADDRESS", &address)
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("rauc (package rauc)");
    reap.1.push(service);
    let rauc = |args: &[&str]| {
        Command::new("rauc")
            .args(args)
            .env("DBUS_SYSTEM_BUS_ADDRESS", &address)
            .output()
            .expect("rauc")
    };
    let status = || -> serde_json::Value {
        for _ in 0..50 {
            let out = rauc(&["status", "--output-format=json"]);
            if out.status.success() {
                return serde_json::from_slice(&out.stdout).expect("rauc status json");
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        panic!(
            "rauc status never answered: {}",
            fs::read_to_string(d.join("service.log")).unwrap_or_default()
        );
    };
    let boot_status = |s: &serde_json::Value, slot: &str| -> String {
        s["slots"]
            .as_array()
            .expect("slots")
            .iter()
            .find_map(|e| e.get(slot))
            .and_then(|v| v["boot_status"].as_str())
            .expect("boot_status")
            .to_owned()
    };
    let s = status();
    assert_eq!(s["boot_primary"], "rootfs.0");
    assert_eq!(boot_status(&s, "rootfs.0"), "good");
    assert_eq!(boot_status(&s, "rootfs.1"), "bad");

    let ok = |args: &[&str]| {
        let out = rauc(args);
        assert!(
            out.status.success(),
            "rauc {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ok(&["status", "mark-active", "other"]);
    let env = store.read().expect("read");
    assert_eq!(env.order, [SlotName::B, SlotName::A]);
    assert!(env.b.ok && env.b.trial && env.b.tries == 0 && env.committed == SlotName::A);
    let s = status();
    assert_eq!(s["boot_primary"], "rootfs.1");
    assert_eq!(boot_status(&s, "rootfs.1"), "good");

    ok(&["status", "mark-bad", "other"]);
    let env = store.read().expect("read");
    assert!(!env.b.ok && env.b.trial, "a rollback keeps TRIAL: {env:?}");
    assert_eq!(status()["boot_primary"], "rootfs.0");

    ok(&["status", "mark-good"]);
    let env = store.read().expect("read");
    assert!(env.a.ok && !env.a.trial && env.committed == SlotName::A);

    let log = fs::read_to_string(&calls).expect("calls");
    for call in [
        "get-primary",
        "get-state B",
        "set-primary B",
        "set-state B bad",
        "set-state A good",
    ] {
        assert!(log.lines().any(|l| l == call), "RAUC never called {call:?}: {log}");
    }
    assert!(
        !log.contains("get-current"),
        "RAUC 1.8 does not call get-current: {log}"
    );
}
