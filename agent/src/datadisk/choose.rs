//! Which partition `data-disk` mounts: pure decisions over what was found.
//!
//! On an installed node the kernel command line names the data partition
//! (`archipelago.data=PARTUUID=…`): exactly that one is mounted, or none,
//! and the boot stops there. Without the parameter (live mode, from the
//! stick) the partition labelled `ARCHY-DATA` is mounted only when it is
//! the only candidate: one on a disk that holds the installed layout is an
//! installed node's data and is never a candidate, and two or more
//! candidates mount none.

use std::fmt;
use std::path::PathBuf;

use super::format::Fact;

/// The kernel command line parameter that names the data partition.
pub const DATA_PARAM: &str = "archipelago.data=";

/// Reads the value of `archipelago.data=`: `PARTUUID=<uuid>`, returned
/// in lower case (as blkid and udev write it).
pub fn parse_data_param(value: &str) -> anyhow::Result<String> {
    match value.strip_prefix("PARTUUID=") {
        Some(uuid) if !uuid.is_empty() && uuid.chars().all(|c| c.is_ascii_hexdigit() || c == '-') => {
            Ok(uuid.to_ascii_lowercase())
        }
        _ => anyhow::bail!(
            "kernel command line: {DATA_PARAM}{value} is not allowed; allowed: {DATA_PARAM}PARTUUID=<uuid> \
             (hex digits and dashes; blkid shows a partition's PARTUUID)"
        ),
    }
}

/// The partition `archipelago.data=PARTUUID=…` names is not there, or not
/// alone.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NamedError {
    #[error(
        "the kernel command line names the data partition {DATA_PARAM}PARTUUID={uuid}, and no partition has that \
         PARTUUID: nothing is mounted, and apps do not start. Is the node's disk connected? (blkid lists the partitions)"
    )]
    Missing { uuid: String },
    #[error(
        "the kernel command line names the data partition {DATA_PARAM}PARTUUID={uuid}, and {} partitions have it \
         ({}): nothing is mounted, and apps do not start. Disconnect the copy of this node's disk",
        .devices.len(), shown(.devices)
    )]
    Several { uuid: String, devices: Vec<PathBuf> },
    #[error("cannot look for the partition PARTUUID={uuid}: {why}")]
    Unknown { uuid: String, why: String },
}

fn shown(devices: &[PathBuf]) -> String {
    let shown: Vec<String> = devices.iter().map(|d| d.display().to_string()).collect();
    shown.join(", ")
}

/// The partition named by `uuid`, from the devices that carry it.
pub fn choose_named(uuid: &str, found: Fact<Vec<PathBuf>>) -> Result<PathBuf, NamedError> {
    let found = found.map_err(|why| NamedError::Unknown {
        uuid: uuid.to_owned(),
        why,
    })?;
    match found.as_slice() {
        [] => Err(NamedError::Missing { uuid: uuid.to_owned() }),
        [one] => Ok(one.clone()),
        _ => Err(NamedError::Several {
            uuid: uuid.to_owned(),
            devices: found,
        }),
    }
}

/// A device carrying the data label, and whether its disk holds the
/// installed layout (`Some(disk)`), does not (`None`), or could not be
/// told (`Err`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub device: PathBuf,
    pub installed_disk: Fact<Option<PathBuf>>,
}

/// A labelled device that is not mounted in live mode, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub device: PathBuf,
    pub why: SkipReason,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    /// It lies on a disk that holds the installed layout.
    InstalledNode { disk: PathBuf },
    /// Its disk could not be checked: a doubt is a no.
    Unknown(String),
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.why {
            SkipReason::InstalledNode { disk } => write!(
                f,
                "{} is not mounted: it lies on {}, which holds the Archipelago disk layout (an installed node's \
                 data). Live mode never mounts it; boot from that disk, or name it with {DATA_PARAM}PARTUUID=<uuid>",
                self.device.display(),
                disk.display()
            ),
            SkipReason::Unknown(why) => write!(
                f,
                "{} is not mounted: whether its disk holds an installed node could not be checked ({why})",
                self.device.display()
            ),
        }
    }
}

/// What live mode does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LiveDecision {
    Mount(PathBuf),
    /// No candidate: the node runs from RAM.
    InRam,
    /// Two or more candidates: none is mounted.
    Ambiguous(Vec<PathBuf>),
}

/// The decision of live mode over the labelled devices found, and those
/// left out.
pub fn choose_live(candidates: &[Candidate]) -> (LiveDecision, Vec<Skipped>) {
    let mut eligible = Vec::new();
    let mut skipped = Vec::new();
    for c in candidates {
        match &c.installed_disk {
            Ok(None) => eligible.push(c.device.clone()),
            Ok(Some(disk)) => skipped.push(Skipped {
                device: c.device.clone(),
                why: SkipReason::InstalledNode { disk: disk.clone() },
            }),
            Err(why) => skipped.push(Skipped {
                device: c.device.clone(),
                why: SkipReason::Unknown(why.clone()),
            }),
        }
    }
    let decision = match eligible.as_slice() {
        [] => LiveDecision::InRam,
        [one] => LiveDecision::Mount(one.clone()),
        _ => LiveDecision::Ambiguous(eligible),
    };
    (decision, skipped)
}

/// The console's words for [`LiveDecision::Ambiguous`].
pub fn ambiguous_message(label: &str, devices: &[PathBuf]) -> String {
    format!(
        "{} partitions carry the label {label} ({}): none is mounted, because which one holds this node's data \
         is not clear, and apps do not start. Disconnect or relabel all but one (e2label DEVICE NEWLABEL), or \
         name one with {DATA_PARAM}PARTUUID=<uuid> (blkid shows it)",
        devices.len(),
        shown(devices)
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn p(s: &str) -> PathBuf {
        PathBuf::from(s)
    }

    #[test]
    fn the_data_parameter_takes_a_partuuid_only() {
        assert_eq!(
            parse_data_param("PARTUUID=12C8A925-3469-0347-8D8B-4C63389158EC").unwrap(),
            "12c8a925-3469-0347-8d8b-4c63389158ec"
        );
        for bad in ["/dev/sda5", "PARTUUID=", "PARTUUID=zz", "UUID=1234", "LABEL=ARCHY-DATA"] {
            let e = parse_data_param(bad).unwrap_err().to_string();
            assert!(
                e.contains(bad) && e.contains("allowed: archipelago.data=PARTUUID=<uuid>"),
                "{e}"
            );
        }
    }

    #[test]
    fn a_named_partition_is_mounted_only_when_exactly_one_has_it() {
        assert_eq!(choose_named("ab", Ok(vec![p("/dev/vda5")])), Ok(p("/dev/vda5")));
        let missing = choose_named("ab", Ok(vec![])).unwrap_err();
        assert_eq!(missing, NamedError::Missing { uuid: "ab".into() });
        assert!(
            missing.to_string().contains("no partition has that PARTUUID"),
            "{missing}"
        );
        let two = choose_named("ab", Ok(vec![p("/dev/vda5"), p("/dev/sdb5")])).unwrap_err();
        assert!(
            two.to_string().contains("2 partitions have it (/dev/vda5, /dev/sdb5)"),
            "{two}"
        );
        assert!(matches!(
            choose_named("ab", Err("blkid exited 4".into())),
            Err(NamedError::Unknown { .. })
        ));
    }

    #[test]
    fn live_mode_mounts_the_one_candidate_never_an_installed_nodes_and_none_of_two() {
        let plain = |d: &str| Candidate {
            device: p(d),
            installed_disk: Ok(None),
        };
        let installed = Candidate {
            device: p("/dev/vda5"),
            installed_disk: Ok(Some(p("/dev/vda"))),
        };
        assert_eq!(choose_live(&[]), (LiveDecision::InRam, vec![]));
        assert_eq!(choose_live(&[plain("/dev/sdb")]).0, LiveDecision::Mount(p("/dev/sdb")));

        let (decision, skipped) = choose_live(&[installed.clone(), plain("/dev/sdb")]);
        assert_eq!(decision, LiveDecision::Mount(p("/dev/sdb")));
        assert_eq!(skipped.len(), 1);
        let said = skipped[0].to_string();
        assert!(said.contains("/dev/vda5 is not mounted: it lies on /dev/vda"), "{said}");

        let (decision, _) = choose_live(std::slice::from_ref(&installed));
        assert_eq!(decision, LiveDecision::InRam);

        let (decision, _) = choose_live(&[plain("/dev/sdb"), plain("/dev/sdc1")]);
        assert_eq!(decision, LiveDecision::Ambiguous(vec![p("/dev/sdb"), p("/dev/sdc1")]));
        let said = ambiguous_message("ARCHY-DATA", &[p("/dev/sdb"), p("/dev/sdc1")]);
        assert!(said.starts_with("2 partitions carry the label ARCHY-DATA (/dev/sdb, /dev/sdc1): none is mounted"));

        // A disk that cannot be checked is a doubt: not mounted.
        let unknown = Candidate {
            device: p("/dev/sdd1"),
            installed_disk: Err("sfdisk failed".into()),
        };
        let (decision, skipped) = choose_live(&[unknown]);
        assert_eq!(decision, LiveDecision::InRam);
        assert!(skipped[0].to_string().contains("could not be checked (sfdisk failed)"));
    }
}
