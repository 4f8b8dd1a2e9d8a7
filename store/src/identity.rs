//! Which shard this daemon is, from the platform that started it: its index and the cluster's
//! shard count from flags, or from what Kubernetes (a StatefulSet's pod ordinal, an Indexed Job's
//! completion index) or Slurm (a task's rank and count) gives each process. No I/O: the caller
//! hands in the environment and the hostname, so every rule is tested without a platform.

use crate::StoreError;

/// Where a daemon takes its shard index (and, for Slurm, the shard count) from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdentitySource {
    /// `--shard` and `--shards` (0 and 1 when left out).
    Flags,
    /// A Kubernetes StatefulSet: the index is the pod's ordinal, the number after the last `-`
    /// of its hostname (`hetkv-3`); the count is `--shards` (the StatefulSet's replicas).
    StatefulSet,
    /// A Kubernetes Indexed Job: the index is `JOB_COMPLETION_INDEX`; the count is `--shards`.
    IndexedJob,
    /// Slurm: the index is `SLURM_PROCID`, the count `SLURM_NTASKS`.
    Slurm,
}

impl std::str::FromStr for IdentitySource {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "flags" => Ok(Self::Flags),
            "statefulset" => Ok(Self::StatefulSet),
            "indexed-job" => Ok(Self::IndexedJob),
            "slurm" => Ok(Self::Slurm),
            other => Err(format!(
                "identity {other:?} is not flags, statefulset, indexed-job or slurm"
            )),
        }
    }
}

/// A shard's place in its cluster, and where it came from (for the log).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardIdentity {
    /// This shard's index.
    pub shard: u32,
    /// Shards in the cluster.
    pub shards: u32,
    /// What gave them, in words.
    pub from: String,
}

/// The identity `source` gives, with the flags (`shard`, `shards`: `None` when not given),
/// the environment (`env` reads a variable) and the hostname. A flag given beside a platform's
/// value must agree with it; a value missing, malformed or out of range is an error naming the
/// variable and what it held.
pub fn resolve(
    source: IdentitySource,
    shard: Option<u32>,
    shards: Option<u32>,
    env: &dyn Fn(&str) -> Option<String>,
    hostname: Option<&str>,
) -> Result<ShardIdentity, StoreError> {
    let bad = |m: String| Err(StoreError::Config(m));
    let number = |name: &str, what: &str| -> Result<u32, StoreError> {
        let v = env(name).ok_or_else(|| {
            StoreError::Config(format!(
                "--identity {what}: the environment has no {name} (is this process started by \
                 {what}?)"
            ))
        })?;
        v.trim().parse().map_err(|_| {
            StoreError::Config(format!(
                "--identity {what}: {name} is {v:?}, not a shard index"
            ))
        })
    };
    let needs_count = |what: &str| -> Result<u32, StoreError> {
        shards.ok_or_else(|| {
            StoreError::Config(format!(
                "--identity {what} gives this shard's index; give the shard count with --shards"
            ))
        })
    };
    let (index, count, from) = match source {
        IdentitySource::Flags => (
            shard.unwrap_or(0),
            shards.unwrap_or(1),
            "--shard and --shards".to_string(),
        ),
        IdentitySource::StatefulSet => {
            let Some(host) = hostname else {
                return bad("--identity statefulset: the hostname could not be read".into());
            };
            let ordinal = host
                .rsplit_once('-')
                .and_then(|(_, n)| n.parse::<u32>().ok())
                .ok_or_else(|| {
                    StoreError::Config(format!(
                        "--identity statefulset: the hostname {host:?} does not end in a pod \
                         ordinal (name-N)"
                    ))
                })?;
            (
                ordinal,
                needs_count("statefulset")?,
                format!("the StatefulSet ordinal of {host}"),
            )
        }
        IdentitySource::IndexedJob => (
            number("JOB_COMPLETION_INDEX", "indexed-job")?,
            needs_count("indexed-job")?,
            "JOB_COMPLETION_INDEX".to_string(),
        ),
        IdentitySource::Slurm => {
            let count = number("SLURM_NTASKS", "slurm")?;
            if shards.is_some_and(|s| s != count) {
                return bad(format!(
                    "--shards {} disagrees with SLURM_NTASKS={count}",
                    shards.unwrap_or_default()
                ));
            }
            (
                number("SLURM_PROCID", "slurm")?,
                count,
                "SLURM_PROCID and SLURM_NTASKS".to_string(),
            )
        }
    };
    if source != IdentitySource::Flags {
        if let Some(s) = shard.filter(|&s| s != index) {
            return bad(format!(
                "--shard {s} disagrees with {from}, which gives {index}"
            ));
        }
    }
    if count == 0 || index >= count {
        return bad(format!(
            "shard index {index} is not below the shard count {count} (from {from})"
        ));
    }
    Ok(ShardIdentity {
        shard: index,
        shards: count,
        from,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    fn ok(r: Result<ShardIdentity, StoreError>) -> (u32, u32) {
        let id = r.unwrap();
        (id.shard, id.shards)
    }

    fn err(r: Result<ShardIdentity, StoreError>) -> String {
        r.unwrap_err().to_string()
    }

    #[test]
    fn each_platform_gives_its_index_and_count() {
        let none = env(&[]);
        assert_eq!(
            ok(resolve(IdentitySource::Flags, None, None, &none, None)),
            (0, 1)
        );
        assert_eq!(
            ok(resolve(
                IdentitySource::Flags,
                Some(2),
                Some(3),
                &none,
                None
            )),
            (2, 3)
        );
        assert_eq!(
            ok(resolve(
                IdentitySource::StatefulSet,
                None,
                Some(4),
                &none,
                Some("hetkv-store-3")
            )),
            (3, 4)
        );
        let job = env(&[("JOB_COMPLETION_INDEX", "1")]);
        assert_eq!(
            ok(resolve(
                IdentitySource::IndexedJob,
                None,
                Some(2),
                &job,
                None
            )),
            (1, 2)
        );
        let slurm = env(&[("SLURM_PROCID", "5"), ("SLURM_NTASKS", "8")]);
        assert_eq!(
            ok(resolve(IdentitySource::Slurm, None, None, &slurm, None)),
            (5, 8)
        );
        assert_eq!(
            ok(resolve(
                IdentitySource::Slurm,
                Some(5),
                Some(8),
                &slurm,
                None
            )),
            (5, 8),
            "flags that agree"
        );
    }

    #[test]
    fn what_is_missing_malformed_or_out_of_range_is_named() {
        let none = env(&[]);
        let e = err(resolve(
            IdentitySource::StatefulSet,
            None,
            Some(2),
            &none,
            Some("trainer"),
        ));
        assert!(e.contains("\"trainer\"") && e.contains("ordinal"), "{e}");
        let e = err(resolve(
            IdentitySource::StatefulSet,
            None,
            None,
            &none,
            Some("hetkv-0"),
        ));
        assert!(e.contains("--shards"), "{e}");
        let e = err(resolve(
            IdentitySource::StatefulSet,
            None,
            Some(2),
            &none,
            Some("hetkv-2"),
        ));
        assert!(e.contains("index 2 is not below the shard count 2"), "{e}");
        let e = err(resolve(
            IdentitySource::IndexedJob,
            None,
            Some(2),
            &none,
            None,
        ));
        assert!(e.contains("JOB_COMPLETION_INDEX"), "{e}");
        let bad = env(&[("JOB_COMPLETION_INDEX", "one")]);
        let e = err(resolve(
            IdentitySource::IndexedJob,
            None,
            Some(2),
            &bad,
            None,
        ));
        assert!(e.contains("\"one\""), "{e}");
        let slurm = env(&[("SLURM_PROCID", "1"), ("SLURM_NTASKS", "2")]);
        let e = err(resolve(IdentitySource::Slurm, None, Some(3), &slurm, None));
        assert!(e.contains("SLURM_NTASKS=2"), "{e}");
        let e = err(resolve(IdentitySource::Slurm, Some(0), None, &slurm, None));
        assert!(e.contains("--shard 0 disagrees"), "{e}");
        let e = err(resolve(
            IdentitySource::Flags,
            Some(1),
            Some(1),
            &none,
            None,
        ));
        assert!(e.contains("not below"), "{e}");
    }
}
