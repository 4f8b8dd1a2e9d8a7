//! MovieLens ml-100k: a real, mildly skewed data set for correctness runs.
//!
//! GroupLens' terms keep it out of the repository: it is fetched when needed from the PyPI wheel
//! `recbole==1.2.1` (`recbole/dataset_example/ml-100k/ml-100k.inter`), with pip, and the one file
//! is extracted with Python's zipfile, into a cache directory.

use std::collections::HashMap;
use std::io::{self, BufRead};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde::Serialize;

/// The wheel that ships ml-100k.
pub const WHEEL: &str = "recbole==1.2.1";
/// The file inside it.
pub const MEMBER: &str = "recbole/dataset_example/ml-100k/ml-100k.inter";

/// Returns the path of `ml-100k.inter` in `cache_dir`, fetching it first if it is not there.
pub fn fetch(cache_dir: &Path) -> Result<PathBuf> {
    let target = cache_dir.join("ml-100k.inter");
    if target.exists() {
        return Ok(target);
    }
    std::fs::create_dir_all(cache_dir)
        .with_context(|| format!("creating {}", cache_dir.display()))?;
    let wheels = cache_dir.join("wheel");
    let status = Command::new("python3")
        .args(["-m", "pip", "download", WHEEL, "--no-deps", "--quiet", "-d"])
        .arg(&wheels)
        .status()
        .context("running python3 -m pip download (python3 with pip is needed to fetch ml-100k)")?;
    if !status.success() {
        bail!("pip download {WHEEL} failed ({status}): is PyPI reachable?");
    }
    let script = format!(
        "import glob, sys, zipfile\n\
         w = glob.glob(sys.argv[1] + '/recbole-*.whl')[0]\n\
         open(sys.argv[2], 'wb').write(zipfile.ZipFile(w).read('{MEMBER}'))\n"
    );
    let tmp = cache_dir.join("ml-100k.inter.tmp");
    let status = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&wheels)
        .arg(&tmp)
        .status()
        .context("running python3 to extract ml-100k from the wheel")?;
    if !status.success() {
        bail!("extracting {MEMBER} from the {WHEEL} wheel failed ({status})");
    }
    std::fs::rename(&tmp, &target)?;
    Ok(target)
}

/// One rating.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rating {
    /// User id.
    pub user: u32,
    /// Item id.
    pub item: u32,
    /// Rating, 1 to 5.
    pub rating: f32,
    /// Unix time.
    pub timestamp: u64,
}

/// Ratings read, and lines skipped as malformed.
#[derive(Debug, Default)]
pub struct Ratings {
    /// The ratings, in file order.
    pub ratings: Vec<Rating>,
    /// Lines that did not parse (the header excluded), with the first few shown.
    pub malformed: u64,
    /// The first malformed lines: line number and content.
    pub examples: Vec<(u64, String)>,
}

/// Reads a recbole `.inter` file: a header line, then `user \t item \t rating \t timestamp`.
pub fn read(input: impl BufRead) -> io::Result<Ratings> {
    let mut out = Ratings::default();
    for (n, line) in input.lines().enumerate() {
        let line = line?;
        if n == 0 && line.starts_with("user_id") {
            continue;
        }
        let f: Vec<&str> = line.split('\t').collect();
        let parsed = (f.len() == 4)
            .then(|| {
                Some(Rating {
                    user: f[0].parse().ok()?,
                    item: f[1].parse().ok()?,
                    rating: f[2].parse().ok()?,
                    timestamp: f[3].parse::<f64>().ok().map(|t| t as u64)?,
                })
            })
            .flatten();
        match parsed {
            Some(r) => out.ratings.push(r),
            None => {
                out.malformed += 1;
                if out.examples.len() < 10 {
                    out.examples
                        .push((n as u64 + 1, line.chars().take(120).collect()));
                }
            }
        }
    }
    Ok(out)
}

/// What the data set looks like.
#[derive(Debug, Serialize)]
pub struct Summary {
    /// Ratings.
    pub ratings: usize,
    /// Distinct users.
    pub users: usize,
    /// Distinct items.
    pub items: usize,
    /// Share of ratings on the most rated 10% of items.
    pub top10_item_share: f64,
    /// Lines skipped as malformed.
    pub malformed: u64,
}

/// Counts users, items and the skew of item popularity.
pub fn summarize(r: &Ratings) -> Summary {
    let mut items: HashMap<u32, u64> = HashMap::new();
    let mut users = std::collections::HashSet::new();
    for x in &r.ratings {
        *items.entry(x.item).or_default() += 1;
        users.insert(x.user);
    }
    let mut counts: Vec<u64> = items.values().copied().collect();
    counts.sort_unstable_by(|a, b| b.cmp(a));
    let top = counts.len().div_ceil(10);
    Summary {
        ratings: r.ratings.len(),
        users: users.len(),
        items: counts.len(),
        top10_item_share: counts.iter().take(top).sum::<u64>() as f64
            / r.ratings.len().max(1) as f64,
        malformed: r.malformed,
    }
}

/// `hetkv-bench movielens` settings.
#[derive(clap::Args, Debug, Clone)]
pub struct MovieLensArgs {
    /// Where ml-100k is cached (fetched from PyPI when absent).
    #[arg(long, default_value = "target/datasets")]
    pub cache_dir: PathBuf,
    /// Write the summary here as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Fetches (if needed), reads and summarizes ml-100k.
pub fn run(args: &MovieLensArgs) -> Result<Summary> {
    let path = fetch(&args.cache_dir)?;
    let file = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    Ok(summarize(&read(io::BufReader::new(file))?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_inter_format_and_counts_malformed_lines() {
        let text = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n\
                    196\t242\t3\t881250949\n\
                    186\t302\t3\t891717742\n\
                    oops\n\
                    22\tx\t1\t878887116\n\
                    22\t377\t1\t878887116\n";
        let r = read(text.as_bytes()).unwrap();
        assert_eq!(r.ratings.len(), 3);
        assert_eq!(r.malformed, 2);
        assert_eq!(r.examples[0], (4, "oops".into()));
        assert_eq!(
            r.ratings[2],
            Rating {
                user: 22,
                item: 377,
                rating: 1.0,
                timestamp: 878887116
            }
        );
        let s = summarize(&r);
        assert_eq!((s.ratings, s.users, s.items), (3, 3, 3));
    }
}
