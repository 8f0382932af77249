//! The container side of the confinement races (`confinement.rs` rootful,
//! `rootless.rs` rootless): what the container does to its volume, and how
//! a host file is compared before and after.

use std::fs;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::Path;

/// A host file's content, mode and owner.
pub fn snapshot(path: &Path) -> (Vec<u8>, u32, u32, u32) {
    let md = fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (bytes, md.permissions().mode() & 0o7777, md.uid(), md.gid())
}

/// The container's loops, in its volume at `/data`, whose config files are
/// `conf/app0.conf` to `conf/app{files-1}.conf`. One replaces the folder
/// `conf` by a symlink to the host folder `host` (which holds an
/// `app0.conf`) and back. The other changes the first files' bytes (the
/// agent writes them anew, which takes a while), widens the last file's
/// mode (the agent sets it again) and then replaces that file by a symlink
/// to the host file `victim`, while the agent is busy with the others.
pub fn swapper(host: &Path, victim: &Path, files: usize) -> Vec<String> {
    let last = files - 1;
    let first: Vec<String> = (0..last.clamp(1, 8)).map(|i| i.to_string()).collect();
    let script = format!(
        "cd /data\n\
         while :; do mv conf c1 2>/dev/null && ln -sfn {host} conf; rm -f conf; mv c1 conf 2>/dev/null; sleep 0.02; done &\n\
         while :; do for i in {first}; do echo x > conf/app$i.conf; done 2>/dev/null; \
         chmod 666 conf/app{last}.conf 2>/dev/null; \
         ln -sfn {victim} conf/l 2>/dev/null; mv -f conf/l conf/app{last}.conf 2>/dev/null; done &\n\
         trap 'exit 0' TERM\n\
         wait\n",
        host = host.display(),
        victim = victim.display(),
        first = first.join(" "),
    );
    vec!["sh".into(), "-c".into(), script]
}
