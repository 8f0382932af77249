//! The boot environment (`docs/disk-layout.md`, "Boot counting"): which
//! slot GRUB boots, whether it is on trial and how many tries it used,
//! kept in TWO copies of a GRUB environment block on the ESP,
//! `<esp>/grub/bootenv.0` and `bootenv.1`.
//!
//! Why two copies: GRUB's own `grubenv` (and RAUC's GRUB backend) is one
//! file rewritten in place; a power cut during that write can leave no
//! readable choice. Here every writer (Linux through [`EnvStore::write`],
//! GRUB through `save_env` in `grub.cfg`) writes the OLDER (or unreadable)
//! copy, in place (same 1024 bytes, same clusters: no FAT metadata but a
//! time stamp changes), with `ARCHY_SEQ` one more (mod 3) than the newer
//! copy's. The newer valid copy is the state; if a write is cut, the copy
//! being written is torn and the other one still holds the state before.
//! All variables lie in the first 512 bytes, so only one sector changes;
//! `ARCHY_SEQ` is the first variable and `ARCHY_END` (the same number) the
//! last, so a sector torn between old and new bytes does not read as valid.
//!
//! The block format is GRUB's (`grub-core/lib/envblk.c`), ported here
//! byte for byte ([`grub_vars`], [`grub_set`]): `grub.cfg`'s logic is
//! modelled purely ([`BootEnv::grub_step`], [`grub_boot`]) and the tests
//! check the model against GRUB itself (grub-emu, `agent/tests/grub_boot.rs`).
//!
//! [`rauc_backend`] is RAUC 1.8's custom bootloader backend
//! (`bootloader=custom`) on top of [`EnvStore`]: `archy-agent os rauc-backend`.

use std::fmt;
use std::io::{Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};

/// A GRUB environment block starts with this line.
pub const SIGNATURE: &str = "# GRUB Environment Block\n";
/// Each copy's size: GRUB's usual 1 KiB.
pub const BLOCK_SIZE: usize = 1024;
/// All variables lie within the first sector.
pub const VARS_LIMIT: usize = 512;
/// The two copies' file names in `<esp>/grub/`.
pub const COPIES: [&str; 2] = ["bootenv.0", "bootenv.1"];
/// How many boots a release on trial gets.
pub const MAX_TRIES: u8 = 3;

/// The variables, in their order in a block, and the values each may
/// take. One table for [`encode`], [`decode`] and the checks `grub.cfg`
/// makes (`os::grub`).
pub const VARIABLES: [(&str, &[&str]); 10] = [
    ("ARCHY_SEQ", &["0", "1", "2"]),
    ("ORDER", &["A B", "B A"]),
    ("A_OK", &["0", "1"]),
    ("A_TRIAL", &["0", "1"]),
    ("A_TRY", &["0", "1", "2", "3"]),
    ("B_OK", &["0", "1"]),
    ("B_TRIAL", &["0", "1"]),
    ("B_TRY", &["0", "1", "2", "3"]),
    ("COMMITTED", &["A", "B"]),
    // Not in the API: the seal after the last variable (module docs).
    ("ARCHY_END", &["0", "1", "2"]),
];

/// The variable names `grub.cfg` loads and saves, in block order.
pub fn var_names() -> Vec<&'static str> {
    VARIABLES.iter().map(|(n, _)| *n).collect()
}

/// One of the two system slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum SlotName {
    A,
    B,
}

impl SlotName {
    pub fn other(self) -> SlotName {
        match self {
            SlotName::A => SlotName::B,
            SlotName::B => SlotName::A,
        }
    }

    /// A RAUC bootname (`bootname=A|B` in system.conf), or the value of
    /// `rauc.slot=` on the kernel command line.
    pub fn from_rauc(name: &str) -> Result<SlotName, EnvError> {
        match name {
            "A" => Ok(SlotName::A),
            "B" => Ok(SlotName::B),
            other => Err(EnvError::BadSlot {
                value: other.to_owned(),
            }),
        }
    }

    /// `a` or `b`: `archipelago.slot=`'s spelling and the menu entry ids.
    pub fn lower(self) -> char {
        match self {
            SlotName::A => 'a',
            SlotName::B => 'b',
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SlotName::A => "A",
            SlotName::B => "B",
        }
    }
}

impl fmt::Display for SlotName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One slot's boot state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotBoot {
    /// GRUB may boot it (`<S>_OK`).
    pub ok: bool,
    /// A release on trial: GRUB counts its boots (`<S>_TRIAL`).
    pub trial: bool,
    /// Boots counted, 0..=3 (`<S>_TRY`).
    pub tries: u8,
}

/// The boot environment: one copy's variables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootEnv {
    /// `ARCHY_SEQ`, 0..=2.
    pub seq: u8,
    pub order: [SlotName; 2],
    pub a: SlotBoot,
    pub b: SlotBoot,
    /// The last committed slot: the degraded boot's choice.
    pub committed: SlotName,
}

/// One menu entry of `grub.cfg`: a slot, normal or degraded
/// (`archipelago.degraded=1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub slot: SlotName,
    pub degraded: bool,
}

impl Entry {
    /// Its number in `grub.cfg`: 0 A, 1 B, 2 A degraded, 3 B degraded
    /// (4 restarts).
    pub fn number(self) -> u8 {
        let base = if self.degraded { 2 } else { 0 };
        base + match self.slot {
            SlotName::A => 0,
            SlotName::B => 1,
        }
    }
}

/// What `grub.cfg` does with a readable environment ([`BootEnv::grub_step`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrubStep {
    /// The entry booted.
    pub boot: Entry,
    /// The entry GRUB falls back to if that one does not load (then it
    /// restarts).
    pub fallback: Entry,
    /// The environment after counting (its `seq` as read).
    pub env: BootEnv,
    /// Whether GRUB saves `env` before booting (something changed).
    pub save: bool,
}

impl BootEnv {
    /// A fresh install: A committed and ok, B not ok, order A B.
    pub fn fresh() -> BootEnv {
        BootEnv {
            seq: 0,
            order: [SlotName::A, SlotName::B],
            a: SlotBoot {
                ok: true,
                trial: false,
                tries: 0,
            },
            b: SlotBoot {
                ok: false,
                trial: false,
                tries: 0,
            },
            committed: SlotName::A,
        }
    }

    pub fn slot(&self, s: SlotName) -> &SlotBoot {
        match s {
            SlotName::A => &self.a,
            SlotName::B => &self.b,
        }
    }

    pub fn slot_mut(&mut self, s: SlotName) -> &mut SlotBoot {
        match s {
            SlotName::A => &mut self.a,
            SlotName::B => &mut self.b,
        }
    }

    /// The first ok slot in ORDER (RAUC's primary).
    pub fn primary(&self) -> Option<SlotName> {
        self.order.iter().copied().find(|s| self.slot(*s).ok)
    }

    /// RAUC's set-primary (after writing a slot): `s` first in ORDER, ok,
    /// on trial with no tries used. The committed slot that is ok is only
    /// moved first (`rauc status mark-active` of the running release): it
    /// has nothing to prove.
    pub fn set_primary(&mut self, s: SlotName) {
        self.order = [s, s.other()];
        let known_good = self.committed == s && self.slot(s).ok && !self.slot(s).trial;
        let slot = self.slot_mut(s);
        if !known_good {
            *slot = SlotBoot {
                ok: true,
                trial: true,
                tries: 0,
            };
        }
    }

    /// The commit (RAUC's `set-state s good`, `mark-good`): ok, not on
    /// trial, no tries, and the committed slot.
    pub fn set_good(&mut self, s: SlotName) {
        *self.slot_mut(s) = SlotBoot {
            ok: true,
            trial: false,
            tries: 0,
        };
        self.committed = s;
    }

    /// RAUC's `set-state s bad`: GRUB no longer boots it (a trial flag
    /// stays, so a rollback can be told from a slot never tried).
    pub fn set_bad(&mut self, s: SlotName) {
        self.slot_mut(s).ok = false;
    }

    /// `grub.cfg`'s choice, pure: the first slot in ORDER that is ok; one
    /// on trial is counted (TRY 0→1→2→3, booted each time) and at TRY 3
    /// set not ok, and the next one is considered; a committed one boots
    /// uncounted. No slot: COMMITTED, degraded.
    pub fn grub_step(&self) -> GrubStep {
        let mut env = *self;
        let mut save = false;
        let mut pick = None;
        for s in self.order {
            if pick.is_some() {
                break;
            }
            let slot = env.slot_mut(s);
            if !slot.ok {
                continue;
            }
            if !slot.trial {
                pick = Some(s);
                continue;
            }
            save = true;
            if slot.tries < MAX_TRIES {
                slot.tries += 1;
                pick = Some(s);
            } else {
                slot.ok = false;
            }
        }
        let (boot, fallback) = match pick {
            Some(s) => (
                Entry {
                    slot: s,
                    degraded: false,
                },
                Entry {
                    slot: s.other(),
                    degraded: !env.slot(s.other()).ok,
                },
            ),
            None => degraded(env.committed),
        };
        GrubStep {
            boot,
            fallback,
            env,
            save,
        }
    }

    /// The values of the variables, in block order (`ARCHY_END` = seq).
    fn values(&self) -> Vec<(&'static str, String)> {
        let b = |v: bool| if v { "1" } else { "0" }.to_owned();
        let order = format!("{} {}", self.order[0], self.order[1]);
        vec![
            ("ARCHY_SEQ", self.seq.to_string()),
            ("ORDER", order),
            ("A_OK", b(self.a.ok)),
            ("A_TRIAL", b(self.a.trial)),
            ("A_TRY", self.a.tries.to_string()),
            ("B_OK", b(self.b.ok)),
            ("B_TRIAL", b(self.b.trial)),
            ("B_TRY", self.b.tries.to_string()),
            ("COMMITTED", self.committed.to_string()),
            ("ARCHY_END", self.seq.to_string()),
        ]
    }
}

fn degraded(first: SlotName) -> (Entry, Entry) {
    (
        Entry {
            slot: first,
            degraded: true,
        },
        Entry {
            slot: first.other(),
            degraded: true,
        },
    )
}

/// Why one copy does not hold a valid environment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    #[error("does not start with GRUB's environment block signature {SIGNATURE:?}")]
    NoSignature,
    #[error("has no variable {var}")]
    Missing { var: &'static str },
    #[error("has {var}={value:?}; allowed: {allowed}")]
    Bad {
        var: &'static str,
        value: String,
        allowed: String,
    },
    #[error("has ARCHY_SEQ={seq} but ARCHY_END={end} (a torn write)")]
    Torn { seq: String, end: String },
}

/// Errors of the environment store and the RAUC backend.
#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no readable boot environment: {0}; {1}")]
    Unreadable(String, String),
    #[error("{value:?} is not a slot; allowed: A or B")]
    BadSlot { value: String },
    #[error("rauc-backend: {0}")]
    Usage(String),
    #[error("no slot is bootable (both A_OK and B_OK are 0): no primary")]
    NoPrimary,
    #[error("the booted slot is unknown: /proc/cmdline has no rauc.slot=")]
    NotBooted,
}

/// The block of `env`: signature, the variables, `#` up to 1024 bytes.
pub fn encode(env: &BootEnv) -> Vec<u8> {
    let vars: Vec<(&str, String)> = env.values();
    let pairs: Vec<(&str, &str)> = vars.iter().map(|(n, v)| (*n, v.as_str())).collect();
    // Short fixed values of fixed names: never refused, always within the
    // first sector (the tests check it); an empty block would be refused
    // by every reader, never mistaken for a state.
    encode_block(&pairs).unwrap_or_default()
}

/// A GRUB environment block of `vars` (name, value), 1024 bytes, all of
/// them within the first 512 bytes. Also the format of a release's
/// optional `live/bootargs` ([`encode_bootargs`]). Values may not hold a
/// newline or a backslash (GRUB would need escapes).
pub fn encode_block(vars: &[(&str, &str)]) -> Result<Vec<u8>, String> {
    let mut out = SIGNATURE.as_bytes().to_vec();
    for (name, value) in vars {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("variable name {name:?}: allowed: letters, digits, _"));
        }
        if let Some(c) = value.chars().find(|c| *c == '\n' || *c == '\\' || c.is_control()) {
            return Err(format!(
                "{name}={value:?}: holds {c:?}; allowed: no newline, backslash or control character"
            ));
        }
        out.extend_from_slice(format!("{name}={value}\n").as_bytes());
    }
    if out.len() > VARS_LIMIT {
        return Err(format!(
            "the variables take {} bytes; allowed: at most {VARS_LIMIT} (one sector)",
            out.len()
        ));
    }
    out.resize(BLOCK_SIZE, b'#');
    Ok(out)
}

/// The variable a release's `live/bootargs` sets: extra kernel command
/// line words `grub.cfg` appends when booting that slot.
pub const BOOTARGS_VAR: &str = "ARCHY_ARGS";

/// A release's `live/bootargs` block with these kernel words.
pub fn encode_bootargs(words: &str) -> Result<Vec<u8>, String> {
    if let Some(c) = words
        .chars()
        .find(|c| !c.is_ascii_graphic() && *c != ' ' || *c == '"' || *c == '\'')
    {
        return Err(format!(
            "boot arguments {words:?} hold {c:?}; allowed: printable ASCII words without quotes"
        ));
    }
    encode_block(&[(BOOTARGS_VAR, words)])
}

/// The variables GRUB reads from a block (`grub_envblk_iterate`), the
/// last of a name winning; `None` without the signature.
pub fn grub_vars(buf: &[u8]) -> Option<Vec<(String, String)>> {
    let sig = SIGNATURE.as_bytes();
    if buf.len() < sig.len() || &buf[..sig.len()] != sig {
        return None;
    }
    let mut out: Vec<(String, String)> = Vec::new();
    let pend = buf.len();
    let mut p = sig.len();
    while p < pend {
        if buf[p] == b'#' {
            while p < pend && buf[p] != b'\n' {
                p += 1;
            }
        } else {
            let name_start = p;
            while p < pend && buf[p] != b'=' {
                p += 1;
            }
            if p == pend {
                break;
            }
            let name_end = p;
            p += 1;
            let value_start = p;
            while p < pend {
                if buf[p] == b'\n' {
                    break;
                } else if buf[p] == b'\\' {
                    p += 1;
                }
                p += 1;
            }
            if p >= pend {
                break;
            }
            let name = String::from_utf8_lossy(&buf[name_start..name_end]).into_owned();
            let mut value = Vec::new();
            let mut q = value_start;
            while q < p {
                if buf[q] == b'\\' {
                    q += 1;
                }
                if q < p {
                    value.push(buf[q]);
                }
                q += 1;
            }
            let value = String::from_utf8_lossy(&value).into_owned();
            out.retain(|(n, _)| *n != name);
            out.push((name, value));
        }
        p += 1;
    }
    Some(out)
}

/// GRUB's `grub_envblk_set` on a block read whole: sets `name` in place
/// (or appends it in the `#` padding); false when GRUB says "environment
/// block too small" or the block is broken.
pub fn grub_set(buf: &mut [u8], name: &str, value: &str) -> bool {
    let sig = SIGNATURE.len();
    let name = name.as_bytes();
    let nl = name.len();
    let value = value.as_bytes();
    let vl = value
        .iter()
        .map(|c| if *c == b'\\' || *c == b'\n' { 2 } else { 1 })
        .sum::<usize>();
    let pend = buf.len();
    if pend <= sig {
        return false;
    }
    let mut space = pend - 1;
    while buf[space] == b'#' {
        if space == 0 {
            return false;
        }
        space -= 1;
    }
    if buf[space] != b'\n' {
        return false;
    }
    space += 1;
    let mut p = sig;
    let mut found = false;
    while p + nl + 1 < space {
        if &buf[p..p + nl] == name && buf[p + nl] == b'=' {
            p += nl + 1;
            let mut len = 0;
            while p + len < space && buf[p + len] != b'\n' {
                if buf[p + len] == b'\\' {
                    len += 2;
                } else {
                    len += 1;
                }
            }
            if p + len >= space {
                return false;
            }
            if ((pend - space) as isize) < vl as isize - len as isize {
                return false;
            }
            if vl < len {
                buf.copy_within(p + len..pend, p + vl);
                let fill = (space + len - vl).min(pend);
                let end = (fill + len - vl).min(pend);
                for b in &mut buf[fill..end] {
                    *b = b'#';
                }
            } else {
                buf.copy_within(p + len..pend - (vl - len), p + vl);
            }
            found = true;
            break;
        }
        // find_next_line
        while p < pend {
            if buf[p] == b'\\' {
                p += 2;
            } else if buf[p] == b'\n' {
                break;
            } else {
                p += 1;
            }
        }
        p += 1;
    }
    if !found {
        if pend - space < nl + 1 + vl + 1 {
            return false;
        }
        buf[space..space + nl].copy_from_slice(name);
        p = space + nl;
        buf[p] = b'=';
        p += 1;
    }
    for c in value {
        if *c == b'\n' || *c == b'\\' {
            buf[p] = b'\\';
            p += 1;
        }
        buf[p] = *c;
        p += 1;
    }
    buf[p] = b'\n';
    true
}

/// The environment one copy holds, checked as `grub.cfg` checks it.
pub fn decode(buf: &[u8]) -> Result<BootEnv, BlockError> {
    let vars = grub_vars(buf).ok_or(BlockError::NoSignature)?;
    let get = |var: &'static str| -> Result<&str, BlockError> {
        let value = vars
            .iter()
            .find(|(n, _)| n == var)
            .map(|(_, v)| v.as_str())
            .ok_or(BlockError::Missing { var })?;
        let allowed = VARIABLES
            .iter()
            .find(|(n, _)| *n == var)
            .map(|(_, a)| *a)
            .unwrap_or(&[]);
        if allowed.contains(&value) {
            Ok(value)
        } else {
            Err(BlockError::Bad {
                var,
                value: value.to_owned(),
                allowed: allowed.join(", "),
            })
        }
    };
    let num = |var| -> Result<u8, BlockError> { Ok(get(var)?.parse::<u8>().unwrap_or(0)) };
    let flag = |var| -> Result<bool, BlockError> { Ok(get(var)? == "1") };
    let slot = |var| -> Result<SlotName, BlockError> { Ok(if get(var)? == "A" { SlotName::A } else { SlotName::B }) };
    let seq = num("ARCHY_SEQ")?;
    let order = if get("ORDER")? == "A B" {
        [SlotName::A, SlotName::B]
    } else {
        [SlotName::B, SlotName::A]
    };
    let env = BootEnv {
        seq,
        order,
        a: SlotBoot {
            ok: flag("A_OK")?,
            trial: flag("A_TRIAL")?,
            tries: num("A_TRY")?,
        },
        b: SlotBoot {
            ok: flag("B_OK")?,
            trial: flag("B_TRIAL")?,
            tries: num("B_TRY")?,
        },
        committed: slot("COMMITTED")?,
    };
    let end = get("ARCHY_END")?;
    if end != seq.to_string() {
        return Err(BlockError::Torn {
            seq: seq.to_string(),
            end: end.to_owned(),
        });
    }
    Ok(env)
}

/// Which of two decoded copies is the state: the newer valid one (copy
/// X is newer than Y iff X.seq == Y.seq + 1 mod 3; equal: copy 0), or
/// the only valid one.
pub fn newer(copies: [Option<&BootEnv>; 2]) -> Option<usize> {
    match copies {
        [Some(c0), Some(c1)] => Some(if c1.seq == (c0.seq + 1) % 3 { 1 } else { 0 }),
        [Some(_), None] => Some(0),
        [None, Some(_)] => Some(1),
        [None, None] => None,
    }
}

/// One GRUB run on the two copies' bytes (`None`: no file), pure: what
/// `grub.cfg` boots and what it writes where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrubBoot {
    pub boot: Entry,
    pub fallback: Entry,
    /// The copy GRUB wrote (0 or 1) and its bytes after.
    pub written: Option<(usize, Vec<u8>)>,
}

/// `grub.cfg` on these copies: the newer valid copy's [`BootEnv::grub_step`];
/// a changed environment is saved into the other copy, or, when GRUB
/// cannot write that one (no file, no signature, no room), into the copy
/// read, in place; if neither takes it a counted trial is not booted:
/// COMMITTED boots degraded. No valid copy: A degraded, then B.
pub fn grub_boot(copies: [Option<&[u8]>; 2]) -> GrubBoot {
    let decoded = copies.map(|c| c.and_then(|b| decode(b).ok()));
    let chosen = newer([decoded[0].as_ref(), decoded[1].as_ref()]).and_then(|i| decoded[i].map(|env| (i, env)));
    let Some((use_, env)) = chosen else {
        let (boot, fallback) = degraded(SlotName::A);
        return GrubBoot {
            boot,
            fallback,
            written: None,
        };
    };
    let step = env.grub_step();
    if !step.save {
        return GrubBoot {
            boot: step.boot,
            fallback: step.fallback,
            written: None,
        };
    }
    let mut saved = step.env;
    saved.seq = (env.seq + 1) % 3;
    for target in [1 - use_, use_] {
        if let Some(bytes) = copies[target] {
            let mut buf = bytes.to_vec();
            if grub_vars(&buf).is_some() && saved.values().iter().all(|(n, v)| grub_set(&mut buf, n, v)) {
                return GrubBoot {
                    boot: step.boot,
                    fallback: step.fallback,
                    written: Some((target, buf)),
                };
            }
        }
    }
    let (boot, fallback) = degraded(env.committed);
    GrubBoot {
        boot,
        fallback,
        written: None,
    }
}

/// Where the boot environment is on a running node: the ESP's `grub/`,
/// mounted by `archy-agent os boot-prepare`.
pub const ENV_DIR: &str = "/run/archipelago/esp/grub";

/// The two copies in a folder: `<esp>/grub` on a node ([`ENV_DIR`]).
#[derive(Debug, Clone)]
pub struct EnvStore {
    dir: PathBuf,
}

/// What each copy holds, for diagnostics.
pub type CopyState = Result<BootEnv, String>;

impl EnvStore {
    pub fn new(grub_dir: PathBuf) -> Self {
        EnvStore { dir: grub_dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A copy's path (0 or 1).
    pub fn copy_path(&self, i: usize) -> PathBuf {
        self.dir.join(COPIES[i % 2])
    }

    /// Each copy: its environment, or why it has none.
    pub fn copies(&self) -> Result<[CopyState; 2], EnvError> {
        let read = |i: usize| -> Result<CopyState, EnvError> {
            let path = self.copy_path(i);
            match std::fs::read(&path) {
                Ok(bytes) => Ok(decode(&bytes).map_err(|e| format!("{} {e}", path.display()))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    Ok(Err(format!("{} does not exist", path.display())))
                }
                Err(source) => Err(EnvError::Io { path, source }),
            }
        };
        Ok([read(0)?, read(1)?])
    }

    /// The state: the newer valid copy.
    pub fn read(&self) -> Result<BootEnv, EnvError> {
        match self.copies()? {
            [Ok(c0), Ok(c1)] => Ok(if newer([Some(&c0), Some(&c1)]) == Some(1) {
                c1
            } else {
                c0
            }),
            [Ok(c0), Err(_)] => Ok(c0),
            [Err(_), Ok(c1)] => Ok(c1),
            [Err(e0), Err(e1)] => Err(EnvError::Unreadable(e0, e1)),
        }
    }

    /// Writes `env` (its `seq` is set here) into the older or unreadable
    /// copy, in place, synced: the newer copy is never touched.
    /// Returns the copy written.
    pub fn write(&self, env: &BootEnv) -> Result<usize, EnvError> {
        let [c0, c1] = self.copies()?;
        let (target, seq) = match newer([c0.as_ref().ok(), c1.as_ref().ok()]) {
            Some(0) => (1, c0.map(|e| (e.seq + 1) % 3).unwrap_or(0)),
            Some(_) => (0, c1.map(|e| (e.seq + 1) % 3).unwrap_or(0)),
            None => (0, 0),
        };
        let mut env = *env;
        env.seq = seq;
        self.write_copy(target, &env)?;
        Ok(target)
    }

    fn write_copy(&self, i: usize, env: &BootEnv) -> Result<(), EnvError> {
        let path = self.copy_path(i);
        let io = |source| EnvError::Io {
            path: path.clone(),
            source,
        };
        let existed = path.exists();
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        f.seek(SeekFrom::Start(0)).map_err(io)?;
        f.write_all(&encode(env)).map_err(io)?;
        if f.metadata().map_err(io)?.len() > BLOCK_SIZE as u64 {
            f.set_len(BLOCK_SIZE as u64).map_err(io)?;
        }
        f.sync_all().map_err(io)?;
        if !existed {
            std::fs::File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(|source| EnvError::Io {
                    path: self.dir.clone(),
                    source,
                })?;
        }
        Ok(())
    }

    /// The installer's: both copies of a fresh environment (copy 0 seq 0,
    /// copy 1 seq 1, the newer).
    pub fn init(&self) -> Result<(), EnvError> {
        let mut env = BootEnv::fresh();
        for i in 0..2 {
            let path = self.copy_path(i);
            if path.exists() {
                std::fs::remove_file(&path).map_err(|source| EnvError::Io { path, source })?;
            }
            env.seq = i as u8;
            self.write_copy(i, &env)?;
        }
        Ok(())
    }

    /// Reads, changes and writes the environment, holding an exclusive
    /// `flock` on the folder so two Linux writers (RAUC's backend, the
    /// boot checks) do not write the same older copy one after the other
    /// from the same state. Returns the environment written.
    pub fn update(&self, change: impl FnOnce(&mut BootEnv)) -> Result<BootEnv, EnvError> {
        let io = |source| EnvError::Io {
            path: self.dir.clone(),
            source,
        };
        let dir = std::fs::File::open(&self.dir).map_err(io)?;
        rustix::fs::flock(&dir, rustix::fs::FlockOperation::LockExclusive).map_err(|e| io(e.into()))?;
        let mut env = self.read()?;
        change(&mut env);
        self.write(&env)?;
        self.read()
    }
}

/// RAUC 1.8's custom bootloader backend (`bootloader=custom`,
/// `docs/integration.rst` "Custom bootloader backend interface",
/// `src/bootchooser.c`): RAUC runs the handler with `get-primary`,
/// `set-primary <bootname>`, `get-state <bootname>` (prints good|bad),
/// `set-state <bootname> good|bad`, reads stdout (stripped) and takes a
/// non-zero exit as failure. RAUC 1.8 never calls `get-current` (later
/// RAUC does; it is answered from `rauc.slot=` all the same). Returns
/// what to print.
pub fn rauc_backend(args: &[String], store: &EnvStore, booted: Option<SlotName>) -> Result<String, EnvError> {
    let usage = "get-primary | set-primary A|B | get-state A|B | set-state A|B good|bad | get-current";
    let arg = |i: usize| args.get(i).map(String::as_str);
    match (arg(0), arg(1), arg(2), args.len()) {
        (Some("get-primary"), _, _, 1) => Ok(format!("{}\n", store.read()?.primary().ok_or(EnvError::NoPrimary)?)),
        (Some("get-current"), _, _, 1) => Ok(format!("{}\n", booted.ok_or(EnvError::NotBooted)?)),
        (Some("set-primary"), Some(s), _, 2) => {
            let s = SlotName::from_rauc(s)?;
            store.update(|e| e.set_primary(s))?;
            Ok(String::new())
        }
        (Some("get-state"), Some(s), _, 2) => {
            let s = SlotName::from_rauc(s)?;
            Ok(if store.read()?.slot(s).ok { "good\n" } else { "bad\n" }.to_owned())
        }
        (Some("set-state"), Some(s), Some(state), 3) => {
            let s = SlotName::from_rauc(s)?;
            match state {
                "good" => store.update(|e| e.set_good(s))?,
                "bad" => store.update(|e| e.set_bad(s))?,
                other => {
                    return Err(EnvError::Usage(format!(
                        "set-state {s} {other:?}: allowed: good or bad"
                    )))
                }
            };
            Ok(String::new())
        }
        _ => Err(EnvError::Usage(format!("arguments {args:?}; allowed: {usage}"))),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::process::Command;

    fn store() -> (tempfile::TempDir, EnvStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = EnvStore::new(dir.path().to_owned());
        (dir, s)
    }

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_block_is_1024_bytes_with_every_variable_in_the_first_sector() {
        let mut env = BootEnv::fresh();
        env.set_primary(SlotName::B);
        let block = encode(&env);
        assert_eq!(block.len(), BLOCK_SIZE);
        assert!(block.starts_with(SIGNATURE.as_bytes()));
        assert!(block[VARS_LIMIT..].iter().all(|b| *b == b'#'));
        assert_eq!(decode(&block).unwrap(), env);
        let text = String::from_utf8_lossy(&block);
        assert!(text.starts_with(
            "# GRUB Environment Block\nARCHY_SEQ=0\nORDER=B A\nA_OK=1\nA_TRIAL=0\nA_TRY=0\n\
             B_OK=1\nB_TRIAL=1\nB_TRY=0\nCOMMITTED=A\nARCHY_END=0\n#"
        ));
    }

    /// GRUB's own tool reads the block, and its `set` writes the same
    /// bytes as the port of `grub_envblk_set` (package grub-common).
    #[test]
    fn grub_editenv_agrees_with_the_port() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("env");
        let env = BootEnv::fresh();
        std::fs::write(&file, encode(&env)).unwrap();
        let out = Command::new("grub-editenv")
            .arg(&file)
            .arg("list")
            .output()
            .expect("grub-editenv (package grub-common)");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "ARCHY_SEQ=0\nORDER=A B\nA_OK=1\nA_TRIAL=0\nA_TRY=0\nB_OK=0\nB_TRIAL=0\nB_TRY=0\nCOMMITTED=A\nARCHY_END=0\n"
        );
        let mut ours = encode(&env);
        for (name, value) in [
            ("ORDER", "B A"),
            ("A_OK", "0"),
            ("NEW", "x y"),
            ("A_TRY", "3"),
            ("NEW", ""),
        ] {
            assert!(grub_set(&mut ours, name, value));
            let st = Command::new("grub-editenv")
                .arg(&file)
                .arg("set")
                .arg(format!("{name}={value}"))
                .status()
                .unwrap();
            assert!(st.success());
            assert_eq!(std::fs::read(&file).unwrap(), ours, "after {name}={value}");
        }
        // No room, no GRUB block: GRUB refuses; so does the port.
        let mut full = encode(&env);
        assert!(!grub_set(&mut full, "BIG", &"x".repeat(2000)));
        let mut garbage = vec![b'x'; 1024];
        assert!(!grub_set(&mut garbage, "A_OK", "1"));
        let mut short = encode(&env)[..40].to_vec();
        assert!(!grub_set(&mut short, "A_OK", "1"));
    }

    #[test]
    fn damaged_blocks_say_what_is_wrong() {
        let good = String::from_utf8(encode(&BootEnv::fresh())).unwrap();
        assert_eq!(decode(b"garbage"), Err(BlockError::NoSignature));
        assert_eq!(decode(&[]), Err(BlockError::NoSignature));
        let e = decode(good.replace("A_OK=1", "A_OK=7").as_bytes()).unwrap_err();
        assert_eq!(
            e,
            BlockError::Bad {
                var: "A_OK",
                value: "7".into(),
                allowed: "0, 1".into()
            }
        );
        assert!(e.to_string().contains("A_OK=\"7\"; allowed: 0, 1"), "{e}");
        let e = decode(good.replace("COMMITTED=A", "XCOMMITTED=A").as_bytes()).unwrap_err();
        assert_eq!(e, BlockError::Missing { var: "COMMITTED" });
        let e = decode(good.replace("ARCHY_END=0", "ARCHY_END=1").as_bytes()).unwrap_err();
        assert!(matches!(e, BlockError::Torn { .. }), "{e}");
        assert!(decode(good.replace("ORDER=A B", "ORDER=A A").as_bytes()).is_err());
        // Cut short inside the variables.
        assert!(decode(&good.as_bytes()[..60]).is_err());
        // Unknown variables are ignored, the last of a name wins (GRUB's rules).
        let extra = good
            .replacen("#", "X=1\nA_OK=0\n#", 2)
            .replacen("X=1\nA_OK=0\n# GRUB", "# GRUB", 1);
        assert!(!decode(extra.as_bytes()).unwrap().a.ok, "{extra}");
    }

    #[test]
    fn the_newer_copy_is_seq_plus_one_mod_3() {
        let at = |seq| BootEnv {
            seq,
            ..BootEnv::fresh()
        };
        assert_eq!(newer([Some(&at(0)), Some(&at(1))]), Some(1));
        assert_eq!(newer([Some(&at(1)), Some(&at(2))]), Some(1));
        assert_eq!(newer([Some(&at(2)), Some(&at(0))]), Some(1), "wraps around");
        assert_eq!(newer([Some(&at(0)), Some(&at(2))]), Some(0), "wraps around");
        assert_eq!(newer([Some(&at(1)), Some(&at(0))]), Some(0));
        assert_eq!(newer([Some(&at(1)), Some(&at(1))]), Some(0));
        assert_eq!(newer([None, Some(&at(1))]), Some(1));
        assert_eq!(newer([Some(&at(2)), None]), Some(0));
        assert_eq!(newer([None, None]), None);
    }

    #[test]
    fn writes_alternate_into_the_older_copy_and_the_seq_wraps() {
        let (_d, s) = store();
        s.init().unwrap();
        let env = s.read().unwrap();
        assert_eq!(
            env,
            BootEnv {
                seq: 1,
                ..BootEnv::fresh()
            }
        );
        let mut written = Vec::new();
        let mut seqs = Vec::new();
        for _ in 0..5 {
            let before = [0, 1].map(|i| std::fs::read(s.copy_path(i)).unwrap());
            let i = s.write(&env).unwrap();
            // The copy not written is untouched.
            assert_eq!(std::fs::read(s.copy_path(1 - i)).unwrap(), before[1 - i]);
            assert_eq!(std::fs::metadata(s.copy_path(i)).unwrap().len(), 1024);
            written.push(i);
            seqs.push(s.read().unwrap().seq);
        }
        assert_eq!(written, [0, 1, 0, 1, 0]);
        assert_eq!(seqs, [2, 0, 1, 2, 0]);
    }

    #[test]
    fn a_torn_or_garbage_copy_loses_to_the_other_and_is_written_next() {
        let (_d, s) = store();
        s.init().unwrap();
        s.update(|e| e.set_primary(SlotName::B)).unwrap();
        // Copy 0 is now the newer (seq 2): tear it.
        let newer = std::fs::read(s.copy_path(0)).unwrap();
        let mut torn = newer.clone();
        torn[40..300].fill(b'Z');
        for damaged in [torn, b"not a block".to_vec(), Vec::new()] {
            std::fs::write(s.copy_path(0), &damaged).unwrap();
            let env = s.read().unwrap();
            assert_eq!(env.seq, 1, "copy 1 (init's) is the state");
            assert!(!env.b.ok);
            let [c0, c1] = s.copies().unwrap();
            assert!(c0.unwrap_err().contains("bootenv.0"));
            assert!(c1.is_ok());
            // The next write repairs the damaged copy, leaving copy 1 be.
            let c1_bytes = std::fs::read(s.copy_path(1)).unwrap();
            assert_eq!(s.write(&env).unwrap(), 0);
            assert_eq!(std::fs::read(s.copy_path(1)).unwrap(), c1_bytes);
            assert_eq!(s.read().unwrap().seq, 2);
        }
        // A longer file is cut to 1024 bytes.
        std::fs::write(s.copy_path(1), vec![b'x'; 3000]).unwrap();
        assert_eq!(s.write(&BootEnv::fresh()).unwrap(), 1);
        assert_eq!(std::fs::metadata(s.copy_path(1)).unwrap().len(), 1024);
    }

    /// A power cut during a write, at every byte: the copy being written
    /// holds a prefix of the new block and the rest of the old one (or
    /// the reverse). The state read is then the one before the write or
    /// the one after, never a mix.
    #[test]
    fn a_write_cut_at_any_byte_reads_as_before_or_after() {
        let (_d, s) = store();
        s.init().unwrap();
        s.update(|e| e.set_bad(SlotName::B)).unwrap();
        let before = s.read().unwrap();
        let older = 1 - newer_index(&s);
        let old = std::fs::read(s.copy_path(older)).unwrap();
        let mut want_after = before;
        want_after.set_primary(SlotName::B);
        want_after.seq = (before.seq + 1) % 3;
        let new = encode(&want_after);
        let mut outcomes = std::collections::BTreeSet::new();
        for k in 0..=BLOCK_SIZE {
            for torn in [[&new[..k], &old[k..]].concat(), [&old[..k], &new[k..]].concat()] {
                std::fs::write(s.copy_path(older), &torn).unwrap();
                let got = s.read().unwrap();
                assert!(got == before || got == want_after, "cut at {k}: {got:?}");
                outcomes.insert(got == want_after);
            }
        }
        assert_eq!(outcomes.len(), 2, "both outcomes happen");
    }

    fn newer_index(s: &EnvStore) -> usize {
        let [c0, c1] = s.copies().unwrap();
        newer([c0.as_ref().ok(), c1.as_ref().ok()]).unwrap()
    }

    #[test]
    fn both_copies_damaged_is_an_error_naming_both() {
        let (_d, s) = store();
        std::fs::write(s.copy_path(0), b"junk").unwrap();
        let e = s.read().unwrap_err().to_string();
        assert!(
            e.contains("bootenv.0") && e.contains("signature") && e.contains("bootenv.1 does not exist"),
            "{e}"
        );
        // A write then makes copy 0 valid again.
        assert_eq!(s.write(&BootEnv::fresh()).unwrap(), 0);
        assert_eq!(s.read().unwrap(), BootEnv::fresh());
    }

    #[test]
    fn primary_good_and_bad() {
        let mut e = BootEnv::fresh();
        assert_eq!(e.primary(), Some(SlotName::A));
        e.set_bad(SlotName::B);
        e.set_primary(SlotName::B);
        assert_eq!(e.order, [SlotName::B, SlotName::A]);
        assert_eq!(
            *e.slot(SlotName::B),
            SlotBoot {
                ok: true,
                trial: true,
                tries: 0
            }
        );
        assert_eq!(e.primary(), Some(SlotName::B));
        assert_eq!(e.committed, SlotName::A);
        e.set_bad(SlotName::B);
        assert_eq!(e.primary(), Some(SlotName::A));
        assert!(e.b.trial, "a rollback keeps the trial flag");
        e.set_primary(SlotName::B);
        e.b.tries = 2;
        e.set_good(SlotName::B);
        assert_eq!(
            e.b,
            SlotBoot {
                ok: true,
                trial: false,
                tries: 0
            }
        );
        assert_eq!(e.committed, SlotName::B);
        // The committed good slot made primary again is only moved first.
        e.set_primary(SlotName::A);
        e.set_good(SlotName::A);
        e.set_primary(SlotName::B);
        assert!(e.b.trial, "B is no longer the committed slot: on trial");
        e.set_primary(SlotName::A);
        assert_eq!(e.order, [SlotName::A, SlotName::B]);
        assert!(!e.a.trial);
        e.set_bad(SlotName::A);
        e.set_bad(SlotName::B);
        assert_eq!(e.primary(), None);
    }

    #[test]
    fn grub_step_counts_a_trial_three_times_then_moves_on() {
        let mut e = BootEnv::fresh();
        let entry = |slot, degraded| Entry { slot, degraded };
        let s = e.grub_step();
        assert_eq!(
            (s.boot, s.fallback, s.save),
            (entry(SlotName::A, false), entry(SlotName::B, true), false)
        );
        assert_eq!(s.env, e, "a committed slot is not counted");
        e.set_primary(SlotName::B);
        for n in 1..=3 {
            let s = e.grub_step();
            assert_eq!(s.boot, entry(SlotName::B, false));
            assert_eq!(s.fallback, entry(SlotName::A, false));
            assert!(s.save);
            assert_eq!(s.env.b.tries, n);
            e = s.env;
        }
        let s = e.grub_step();
        assert_eq!(s.boot, entry(SlotName::A, false));
        assert_eq!(s.fallback, entry(SlotName::B, true));
        assert!(s.save && !s.env.b.ok && s.env.b.trial && s.env.b.tries == 3);
        let s2 = s.env.grub_step();
        assert!(!s2.save);
        // Nothing ok: COMMITTED degraded, then the other degraded.
        let mut e = BootEnv::fresh();
        e.set_primary(SlotName::B);
        e.set_good(SlotName::B);
        e.set_bad(SlotName::A);
        e.set_bad(SlotName::B);
        let s = e.grub_step();
        assert_eq!(
            (s.boot, s.fallback),
            (entry(SlotName::B, true), entry(SlotName::A, true))
        );
        assert_eq!(s.boot.number(), 3);
        // Both on trial (an update installed during a trial): counted in turn.
        let mut e = BootEnv::fresh();
        e.set_primary(SlotName::B);
        e.a = SlotBoot {
            ok: true,
            trial: true,
            tries: 3,
        };
        e.b.tries = 3;
        let s = e.grub_step();
        assert_eq!(s.boot, entry(SlotName::A, true), "COMMITTED A, degraded");
        assert!(!s.env.a.ok && !s.env.b.ok && s.save);
    }

    #[test]
    fn grub_boot_without_a_valid_copy_boots_a_degraded() {
        let g = grub_boot([None, Some(b"junk")]);
        assert_eq!(
            g.boot,
            Entry {
                slot: SlotName::A,
                degraded: true
            }
        );
        assert_eq!(
            g.fallback,
            Entry {
                slot: SlotName::B,
                degraded: true
            }
        );
        assert_eq!(g.written, None);
        // A trial whose count no copy can take is not booted.
        let mut e = BootEnv::fresh();
        e.set_primary(SlotName::B);
        let mut block = encode(&e);
        // Readable, but GRUB finds no free space marker: not writable.
        block[BLOCK_SIZE - 1] = b'X';
        assert!(decode(&block).is_ok());
        let g = grub_boot([Some(&block), None]);
        assert_eq!(
            g.boot,
            Entry {
                slot: SlotName::A,
                degraded: true
            }
        );
        assert_eq!(g.written, None);
        // With the other copy present, it takes the count.
        let other = encode(&BootEnv::fresh());
        let g = grub_boot([Some(&block), Some(&other)]);
        assert_eq!(
            g.boot,
            Entry {
                slot: SlotName::B,
                degraded: false
            }
        );
        assert_eq!(g.written.map(|w| w.0), Some(1));
    }

    #[test]
    fn rauc_backend_speaks_rauc_1_8() {
        let (_d, s) = store();
        s.init().unwrap();
        let r = |a: &[&str]| rauc_backend(&args(a), &s, Some(SlotName::A));
        assert_eq!(r(&["get-primary"]).unwrap(), "A\n");
        assert_eq!(r(&["get-state", "A"]).unwrap(), "good\n");
        assert_eq!(r(&["get-state", "B"]).unwrap(), "bad\n");
        assert_eq!(r(&["get-current"]).unwrap(), "A\n");
        assert_eq!(r(&["set-state", "B", "bad"]).unwrap(), "");
        assert_eq!(r(&["set-primary", "B"]).unwrap(), "");
        assert_eq!(r(&["get-primary"]).unwrap(), "B\n");
        assert_eq!(r(&["get-state", "B"]).unwrap(), "good\n");
        let e = s.read().unwrap();
        assert!(e.b.trial && e.b.ok && e.committed == SlotName::A);
        assert_eq!(r(&["set-state", "B", "good"]).unwrap(), "");
        let e = s.read().unwrap();
        assert!(!e.b.trial && e.committed == SlotName::B);
        assert_eq!(r(&["set-state", "A", "bad"]).unwrap(), "");
        assert_eq!(r(&["get-state", "A"]).unwrap(), "bad\n");
        r(&["set-state", "B", "bad"]).unwrap();
        assert!(matches!(r(&["get-primary"]), Err(EnvError::NoPrimary)));
        for bad in [
            &["set-state", "B", "ok"][..],
            &["set-primary", "C"],
            &["get-state"],
            &["frobnicate"],
            &[],
            &["get-primary", "extra"],
        ] {
            let e = r(bad).unwrap_err().to_string();
            assert!(e.contains("allowed"), "{bad:?}: {e}");
        }
        assert!(matches!(
            rauc_backend(&args(&["get-current"]), &s, None),
            Err(EnvError::NotBooted)
        ));
    }

    #[test]
    fn bootargs_are_a_grub_block_of_one_variable() {
        let b = encode_bootargs("archipelago.trial_deadline=60 archipelago.test.unhealthy").unwrap();
        assert_eq!(b.len(), 1024);
        assert_eq!(
            grub_vars(&b).unwrap(),
            [(
                "ARCHY_ARGS".to_owned(),
                "archipelago.trial_deadline=60 archipelago.test.unhealthy".to_owned()
            )]
        );
        for bad in ["a\nb", "x=\"y\"", "a\\b", "é"] {
            assert!(encode_bootargs(bad).is_err(), "{bad:?}");
        }
        assert!(encode_bootargs(&"w ".repeat(300)).unwrap_err().contains("one sector"));
    }
}
