//! Object storage for uploaded files: an [`ObjectStore`] trait (put, get,
//! delete by storage key) and [`LocalDisk`], the default implementation.
//!
//! The store holds bytes it does not understand: the attachments route seals
//! them before they arrive here and opens them after they leave, so a store
//! (a disk, a bucket) never holds anything a person wrote in clear.
//!
//! Keys are made by the server (`<room_id>/<upload_id>`), never taken from a
//! client; [`valid_key`] still refuses anything that could leave the store's
//! root (no `.`, no empty segment, no leading `/`).

use std::io;
use std::path::PathBuf;
use std::pin::Pin;

use bytes::Bytes;
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use tokio::io::{AsyncRead, AsyncWriteExt};
use uuid::Uuid;

/// A stored object's bytes, read in order.
pub type ObjectReader = Pin<Box<dyn AsyncRead + Send>>;

/// Where uploaded bytes rest.
pub trait ObjectStore: Send + Sync + 'static {
    /// Store `chunks` under `key`, all or nothing: until the stream has ended
    /// well nobody sees the object, and a stream that fails leaves nothing
    /// behind (its error is returned as is). Returns the bytes written.
    fn put<'a>(
        &'a self,
        key: &'a str,
        chunks: BoxStream<'a, io::Result<Bytes>>,
    ) -> BoxFuture<'a, io::Result<u64>>;

    /// The object under `key`, or none.
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, io::Result<Option<ObjectReader>>>;

    /// Remove the object under `key`; removing nothing is not an error.
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, io::Result<()>>;
}

/// Whether `key` is one this service could have made: 1 to 8 `/`-separated
/// segments of ASCII letters, digits, `-` and `_`.
pub fn valid_key(key: &str) -> bool {
    let segments: Vec<&str> = key.split('/').collect();
    (1..=8).contains(&segments.len())
        && segments.iter().all(|s| {
            (1..=64).contains(&s.len())
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

fn bad_key() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "not a valid storage key")
}

/// Files under a directory, one per key. Writes go to a temporary file in the
/// same directory, are synced, then renamed over the key's path, so a crash
/// never leaves a half-written object under a key.
#[derive(Debug, Clone)]
pub struct LocalDisk {
    root: PathBuf,
}

impl LocalDisk {
    /// A store rooted at `root` (created on first write).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        LocalDisk { root: root.into() }
    }

    /// The file holding `key`.
    pub fn path(&self, key: &str) -> io::Result<PathBuf> {
        if !valid_key(key) {
            return Err(bad_key());
        }
        Ok(self.root.join(key))
    }

    async fn write(
        &self,
        key: &str,
        mut chunks: BoxStream<'_, io::Result<Bytes>>,
    ) -> io::Result<u64> {
        let path = self.path(key)?;
        let dir = path.parent().ok_or_else(bad_key)?.to_path_buf();
        tokio::fs::create_dir_all(&dir).await?;
        // Keys never contain `.`, so a temporary name can never be a key.
        let tmp = dir.join(format!(".{}.tmp", Uuid::new_v4().simple()));
        let mut options = tokio::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        options.mode(0o600);
        let mut file = options.open(&tmp).await?;
        let written: io::Result<u64> = async {
            let mut n = 0u64;
            while let Some(chunk) = chunks.next().await {
                let chunk = chunk?;
                file.write_all(&chunk).await?;
                n += chunk.len() as u64;
            }
            file.flush().await?;
            file.sync_all().await?;
            Ok(n)
        }
        .await;
        drop(file);
        let n = match written {
            Ok(n) => n,
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(e);
            }
        };
        if let Err(e) = tokio::fs::rename(&tmp, &path).await {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
        // Make the rename itself durable.
        #[cfg(unix)]
        if let Ok(d) = tokio::fs::File::open(&dir).await {
            let _ = d.sync_all().await;
        }
        Ok(n)
    }
}

impl ObjectStore for LocalDisk {
    fn put<'a>(
        &'a self,
        key: &'a str,
        chunks: BoxStream<'a, io::Result<Bytes>>,
    ) -> BoxFuture<'a, io::Result<u64>> {
        Box::pin(self.write(key, chunks))
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, io::Result<Option<ObjectReader>>> {
        Box::pin(async move {
            let path = self.path(key)?;
            match tokio::fs::File::open(&path).await {
                Ok(f) => Ok(Some(
                    Box::pin(tokio::io::BufReader::with_capacity(64 * 1024, f)) as ObjectReader,
                )),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            }
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(async move {
            let path = self.path(key)?;
            match tokio::fs::remove_file(&path).await {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[test]
    fn keys_that_could_leave_the_root_are_refused() {
        for k in [
            "",
            "/etc/passwd",
            "../x",
            "a/../b",
            "a//b",
            "a/./b",
            ".hidden",
            "a\\b",
            "a/b/",
        ] {
            assert!(!valid_key(k), "{k:?}");
        }
        assert!(valid_key("0193aa00-1111-7000-8000-000000000000/abc_def"));
    }

    #[tokio::test]
    async fn put_is_all_or_nothing_and_get_and_delete_round_trip() {
        let root = std::env::temp_dir().join(format!("mathia-objects-{}", Uuid::new_v4()));
        let store = LocalDisk::new(&root);
        let chunks = futures::stream::iter(vec![
            Ok(Bytes::from_static(b"hello ")),
            Ok(Bytes::from_static(b"world")),
        ])
        .boxed();
        assert_eq!(store.put("r/one", chunks).await.unwrap(), 11);
        let mut out = vec![];
        store
            .get("r/one")
            .await
            .unwrap()
            .unwrap()
            .read_to_end(&mut out)
            .await
            .unwrap();
        assert_eq!(out, b"hello world");
        // A failing stream leaves neither the object nor a temporary file.
        let failing = futures::stream::iter(vec![
            Ok(Bytes::from_static(b"part")),
            Err(io::Error::other("client went away")),
        ])
        .boxed();
        assert!(store.put("r/two", failing).await.is_err());
        assert!(store.get("r/two").await.unwrap().is_none());
        let left: Vec<_> = std::fs::read_dir(root.join("r")).unwrap().collect();
        assert_eq!(left.len(), 1, "only r/one remains");
        store.delete("r/one").await.unwrap();
        store.delete("r/one").await.unwrap();
        assert!(store.get("r/one").await.unwrap().is_none());
        assert!(
            store
                .put("../escape", futures::stream::empty().boxed())
                .await
                .is_err()
        );
        let _ = std::fs::remove_dir_all(root);
    }
}
