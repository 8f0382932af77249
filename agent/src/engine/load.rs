//! Helpers for `POST /images/load`: the archive as a request body read in
//! chunks, and the names the engine reports for what it loaded.

use std::io;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use tokio::fs::File;
use tokio::io::AsyncReadExt as _;

/// Bytes read from the archive per body chunk.
const CHUNK_BYTES: usize = 1 << 20;

/// Where the body stream leaves a read error, so that the caller can
/// report the archive's fault instead of the broken connection it causes.
pub(crate) type ReadErrorSlot = Arc<Mutex<Option<io::Error>>>;

/// `file`, in chunks, to the end; a read error ends the stream after
/// being put in `slot`.
pub(crate) fn body(file: File, slot: ReadErrorSlot) -> impl Stream<Item = Result<Bytes, io::Error>> + Send + 'static {
    futures_util::stream::unfold(Some(file), move |file| {
        let slot = slot.clone();
        async move {
            let mut file = file?;
            let mut chunk = BytesMut::with_capacity(CHUNK_BYTES);
            match file.read_buf(&mut chunk).await {
                Ok(0) => None,
                Ok(_) => Some((Ok(chunk.freeze()), Some(file))),
                Err(e) => {
                    let echo = io::Error::new(e.kind(), e.to_string());
                    *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    Some((Err(echo), None))
                }
            }
        }
    })
}

/// The image names in one `stream` line of the answer. Podman 4.3 sends a
/// single `Loaded image: a,b` (its names joined by commas); Docker sends
/// one `Loaded image: name:tag` or `Loaded image ID: sha256:…` per image.
pub(crate) fn loaded_names(line: &str) -> Vec<String> {
    let line = line.trim();
    let names = line
        .strip_prefix("Loaded image ID:")
        .or_else(|| line.strip_prefix("Loaded image:"))
        .or_else(|| line.strip_prefix("Loaded image(s):"));
    names
        .map(|n| {
            n.split(',')
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn podmans_comma_joined_names_and_dockers_id_line_are_both_read() {
        assert_eq!(
            loaded_names("Loaded image: docker.io/a/b:1,localhost/c:2\n"),
            vec!["docker.io/a/b:1", "localhost/c:2"]
        );
        assert_eq!(loaded_names("Loaded image ID: sha256:abc"), vec!["sha256:abc"]);
        assert!(loaded_names("Getting image source signatures").is_empty());
    }
}
