//! Files renewed in place (certificates, keys, CA bundles), watched by the digests of their contents: a change is seen
//! however the file was replaced, and a changed set that was refused is not tried again until it changes once more.

use std::path::PathBuf;
use std::time::Duration;

use tokio::time::{Instant, Interval, MissedTickBehavior};

/// One digest per file, `None` for a file that cannot be read (digests, so that no key material is kept).
type Digests = Vec<Option<[u8; 32]>>;

/// A set of files and what was last done with their contents.
#[derive(Debug)]
pub(crate) struct FileWatch {
    paths: Vec<PathBuf>,
    every: Duration,
    /// Created on the first tick, so that a watch can be made outside the runtime.
    tick: Option<Interval>,
    /// The contents last applied.
    applied: Digests,
    /// Changed contents that were refused (e.g. a key renamed in before its certificate).
    refused: Option<Digests>,
}

impl FileWatch {
    /// Watches `paths` as they are now, checked every `every`. Made before the files are first read, so that a change
    /// in between is seen.
    pub(crate) fn new(paths: Vec<PathBuf>, every: Duration) -> Self {
        let applied = digests(&paths);
        Self { paths, every, tick: None, applied, refused: None }
    }

    /// Calls `apply` when the files differ from both the contents last applied and the contents last refused: `Ok`
    /// makes them the applied ones, `Err` the refused ones. `None` when there is nothing new.
    pub(crate) fn check<T, E>(&mut self, apply: impl FnOnce() -> Result<T, E>) -> Option<Result<T, E>> {
        let now = digests(&self.paths);
        if now == self.applied || self.refused.as_ref() == Some(&now) {
            return None;
        }
        let result = apply();
        if result.is_ok() {
            self.applied = now;
            self.refused = None;
        } else {
            self.refused = Some(now);
        }
        Some(result)
    }

    /// Resolves every `every`, the first time one period after the first call. Cancel-safe.
    pub(crate) async fn tick(&mut self) {
        let every = self.every;
        let tick = self.tick.get_or_insert_with(|| {
            let mut tick = tokio::time::interval_at(Instant::now() + every, every);
            tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
            tick
        });
        tick.tick().await;
    }

    /// [`FileWatch::check`] at every tick until there is something new. Cancel-safe: meant for a `select!` branch.
    pub(crate) async fn changed<T, E>(&mut self, mut apply: impl FnMut() -> Result<T, E>) -> Result<T, E> {
        loop {
            self.tick().await;
            if let Some(result) = self.check(&mut apply) {
                return result;
            }
        }
    }
}

fn digests(paths: &[PathBuf]) -> Digests {
    paths.iter().map(|path| std::fs::read(path).ok().map(|bytes| openssl::sha::sha256(&bytes))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_is_applied_once_and_a_refused_one_not_retried() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, "one").unwrap();
        let mut watch = FileWatch::new(vec![a.clone(), b.clone()], Duration::from_secs(1));
        let mut calls = 0;
        let mut apply = |ok: bool| {
            calls += 1;
            if ok { Ok(()) } else { Err(()) }
        };
        assert_eq!(watch.check(|| apply(true)), None, "unchanged");
        std::fs::write(&b, "appeared").unwrap();
        assert_eq!(watch.check(|| apply(false)), Some(Err(())), "a new file is a change");
        assert_eq!(watch.check(|| apply(true)), None, "refused contents are not tried again");
        std::fs::write(&a, "two").unwrap();
        assert_eq!(watch.check(|| apply(true)), Some(Ok(())));
        assert_eq!(watch.check(|| apply(true)), None, "applied once");
        std::fs::remove_file(&b).unwrap();
        assert_eq!(watch.check(|| apply(true)), Some(Ok(())), "a removed file is a change");
        assert_eq!(calls, 3);
    }

    #[tokio::test]
    async fn changed_waits_for_a_tick_with_something_new() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cert.pem");
        std::fs::write(&file, "old").unwrap();
        let mut watch = FileWatch::new(vec![file.clone()], Duration::from_millis(20));
        let quiet = tokio::time::timeout(Duration::from_millis(150), watch.changed(|| Ok::<_, ()>(()))).await;
        assert!(quiet.is_err(), "nothing changed");
        std::fs::write(&file, "new").unwrap();
        let read = || std::fs::read_to_string(&file).map_err(|_| ());
        let seen = tokio::time::timeout(Duration::from_secs(2), watch.changed(read)).await;
        assert_eq!(seen, Ok(Ok("new".to_string())));
    }
}
