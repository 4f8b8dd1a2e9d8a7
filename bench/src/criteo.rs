//! A Criteo-like synthetic CTR data set with a planted ground-truth model, and Criteo's TSV format.
//!
//! Generator (after `../shared/notes/workloads.md`):
//! - 26 categorical fields with the published Criteo Kaggle cardinalities times a scale factor;
//!   field f draws a rank from a truncated Zipf(s_f) over its V_f ids and maps it through a
//!   per-field bijection (an affine permutation modulo V_f) so hot ids are scattered over shards.
//! - 13 dense features, each floor(LogNormal(1.0, 1.5)).
//! - The planted model, derived from a hash of each key (nothing is stored): a weight
//!   w ~ N(0, 0.30^2) and a 4-dim vector u ~ N(0, 0.12^2) per id;
//!   logit = b + sum of w + sum over field pairs of <u_f, u_g> + sum_i c_i ln(1 + x_i), with
//!   c_i ~ N(0, 0.3^2) per data set and b calibrated so the mean click probability is 25.62%.
//!   (The notes do not give the dense term's scale; with 0.3 the oracle scores AUC 0.824 and
//!   logloss 0.428 on 100,000 samples at scale 0.01, against the notes' 0.849 and 0.403.)
//!   The label is Bernoulli(sigmoid(logit)), and the true probability travels with each sample, so
//!   a report can show the oracle's AUC and logloss beside a model's.
//!
//! Each field owns V_f + 1 rows of one embedding table, the last for a missing value, so a
//! sample's 26 ids are keys of that table.
//!
//! TSV: `label \t I1..I13 \t C1..C26`, an empty field meaning missing; categorical values are
//! 32-bit hex (real files hold hashes; the generator writes the field-local id). The reader counts
//! and skips malformed lines, with the reason, and never panics.

use std::collections::BTreeMap;
use std::io::{self, BufRead, Read, Write};

use anyhow::{ensure, Result};
use hetkv_transport::Initializer;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal, Zipf};

/// Categorical fields.
pub const CATEGORICAL: usize = 26;
/// Dense fields.
pub const DENSE: usize = 13;
/// Criteo Kaggle's click-through rate: 11,745,438 positives in 45,840,617 rows.
pub const CRITEO_CTR: f64 = 0.2562;
/// Published cardinalities of C1..C26 (no frequency threshold; DLRM's list for Kaggle).
pub const KAGGLE_CARDINALITIES: [u64; CATEGORICAL] = [
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27, 14992,
    5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
];

/// Zipf exponent of field `f` (0-based). The big fields carry the fits recorded in the notes;
/// fields of 1.5k to 15k ids take 2.2 (the notes give 1.9 to 2.5) and fields under 1,000 ids 1.1
/// (the notes give 1.0 to 1.2).
pub fn field_exponent(f: usize) -> f64 {
    match f + 1 {
        3 => 1.105,
        12 => 1.121,
        21 => 1.135,
        16 => 1.155,
        4 => 1.233,
        24 => 1.443,
        26 => 1.531,
        10 => 1.590,
        _ if KAGGLE_CARDINALITIES[f] >= 1000 => 2.2,
        _ => 1.1,
    }
}

/// One generated sample.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// The click.
    pub label: bool,
    /// Dense features.
    pub dense: [u32; DENSE],
    /// Field-local ids, one per categorical field.
    pub ids: [u32; CATEGORICAL],
    /// The planted model's click probability.
    pub p: f64,
}

struct Field {
    ids: u64,
    offset: u64,
    zipf: Zipf<f64>,
    mult: u64,
    add: u64,
}

/// The generator, deterministic by seed.
pub struct CriteoSynth {
    fields: Vec<Field>,
    rows: u64,
    bias: f64,
    dense_coef: [f64; DENSE],
    seed: u64,
    rng: SmallRng,
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

impl CriteoSynth {
    /// A data set of the Kaggle cardinalities times `scale` (each field keeps at least one id).
    pub fn new(scale: f64, seed: u64) -> Result<Self> {
        ensure!(
            scale > 0.0 && scale.is_finite(),
            "scale must be finite and > 0, got {scale}"
        );
        let mut setup = SmallRng::seed_from_u64(seed ^ 0xC417_E0C4);
        let mut fields = Vec::with_capacity(CATEGORICAL);
        let mut offset = 0u64;
        for (f, &card) in KAGGLE_CARDINALITIES.iter().enumerate() {
            let ids = ((card as f64 * scale).round() as u64).max(1);
            let zipf = Zipf::new(ids, field_exponent(f))
                .map_err(|e| anyhow::anyhow!("field C{}: zipf({ids}): {e:?}", f + 1))?;
            // An affine bijection of [0, ids): a multiplier coprime to ids.
            let mut mult = setup.gen_range(1..u64::MAX / 2) | 1;
            while gcd(mult % ids, ids) != 1 && ids > 1 {
                mult += 2;
            }
            let add = setup.gen_range(0..ids);
            fields.push(Field {
                ids,
                offset,
                zipf,
                mult: mult % ids.max(1),
                add,
            });
            offset += ids + 1; // the last row of each field stands for "missing"
        }
        let dense_coef = std::array::from_fn(|_| 0.3 * setup.sample::<f64, _>(StandardNormal));
        let mut synth = Self {
            fields,
            rows: offset,
            bias: 0.0,
            dense_coef,
            seed,
            rng: SmallRng::seed_from_u64(seed),
        };
        synth.bias = synth.calibrate(CRITEO_CTR, 100_000);
        synth.rng = SmallRng::seed_from_u64(seed);
        Ok(synth)
    }

    /// Rows of the embedding table that holds every field's ids.
    pub fn table_rows(&self) -> u64 {
        self.rows
    }

    /// Ids of field `f` (excluding its missing row).
    pub fn field_ids(&self, f: usize) -> u64 {
        self.fields[f].ids
    }

    /// The table key of id `id` of field `f`; `None` is the field's missing row.
    pub fn key(&self, f: usize, id: Option<u32>) -> u64 {
        let field = &self.fields[f];
        match id {
            Some(id) => field.offset + id as u64 % field.ids,
            None => field.offset + field.ids,
        }
    }

    /// The raw 64-bit id a CTR log carries for table key `key` (as from [`CriteoSynth::key`]):
    /// a bijection of the key salted by the seed, so ids spread over all of u64 (0 and values
    /// with the top bit set included, as torch's int64 carries them) and the same data can feed
    /// a fixed table (dense keys) and a dynamic one (raw ids).
    pub fn raw_id(&self, key: u64) -> u64 {
        hetkv_transport::hash::splitmix64(key ^ self.seed.rotate_left(17) ^ 0x05EE_D1D5)
    }

    /// The planted weight and interaction vector of table key `key`.
    fn truth(&self, key: u64, w: &mut [f32; 1], u: &mut [f32; 4]) {
        Initializer::Normal {
            std: 0.30,
            seed: self.seed ^ 0x5745_4947,
        }
        .fill(key, w);
        Initializer::Normal {
            std: 0.12,
            seed: self.seed ^ 0x5645_4354,
        }
        .fill(key, u);
    }

    /// The planted logit without the bias.
    fn score(&self, dense: &[u32; DENSE], ids: &[u32; CATEGORICAL]) -> f64 {
        let (mut w, mut u) = ([0f32; 1], [0f32; 4]);
        let mut linear = 0.0;
        let mut sum = [0f64; 4];
        let mut squares = 0.0;
        for (f, &id) in ids.iter().enumerate() {
            self.truth(self.key(f, Some(id)), &mut w, &mut u);
            linear += w[0] as f64;
            for (s, &x) in sum.iter_mut().zip(&u) {
                *s += x as f64;
                squares += (x as f64) * (x as f64);
            }
        }
        // sum over pairs f < g of <u_f, u_g> = (|sum u|^2 - sum |u|^2) / 2
        let pairs = (sum.iter().map(|s| s * s).sum::<f64>() - squares) / 2.0;
        let dense_term: f64 = dense
            .iter()
            .zip(&self.dense_coef)
            .map(|(&x, c)| c * (1.0 + x as f64).ln())
            .sum();
        linear + pairs + dense_term
    }

    fn draw(&mut self) -> ([u32; DENSE], [u32; CATEGORICAL]) {
        let mut dense = [0u32; DENSE];
        for x in &mut dense {
            let z: f64 = self.rng.sample(StandardNormal);
            *x = (1.0 + 1.5 * z).exp().floor().min(u32::MAX as f64) as u32;
        }
        let mut ids = [0u32; CATEGORICAL];
        for (id, field) in ids.iter_mut().zip(&self.fields) {
            let rank = field.zipf.sample(&mut self.rng) as u64 - 1; // sample is 1..=ids
            *id = ((field.mult as u128 * rank as u128 + field.add as u128) % field.ids as u128)
                as u32;
        }
        (dense, ids)
    }

    /// The bias that makes the mean click probability `ctr` over `n` draws of a separate stream.
    fn calibrate(&mut self, ctr: f64, n: usize) -> f64 {
        self.rng = SmallRng::seed_from_u64(self.seed ^ 0xCA11_B8A7);
        let scores: Vec<f64> = (0..n)
            .map(|_| {
                let (dense, ids) = self.draw();
                self.score(&dense, &ids)
            })
            .collect();
        let mean_p = |b: f64| scores.iter().map(|z| sigmoid(b + z)).sum::<f64>() / n as f64;
        let (mut lo, mut hi) = (-20.0, 20.0);
        for _ in 0..80 {
            let mid = (lo + hi) / 2.0;
            if mean_p(mid) < ctr {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        (lo + hi) / 2.0
    }

    /// The next sample.
    pub fn sample(&mut self) -> Sample {
        let (dense, ids) = self.draw();
        let p = sigmoid(self.bias + self.score(&dense, &ids));
        let label = self.rng.gen::<f64>() < p;
        Sample {
            label,
            dense,
            ids,
            p,
        }
    }
}

/// Writes a sample as one Criteo TSV line.
pub fn write_tsv(out: &mut impl Write, s: &Sample) -> io::Result<()> {
    write!(out, "{}", s.label as u8)?;
    for x in &s.dense {
        write!(out, "\t{x}")?;
    }
    for id in &s.ids {
        write!(out, "\t{id:08x}")?;
    }
    writeln!(out)
}

/// One record read from a Criteo TSV file: `None` where a field was empty.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TsvRecord {
    /// The click.
    pub label: bool,
    /// Dense features (real files hold a few negative values).
    pub dense: [Option<i64>; DENSE],
    /// Categorical values as 32-bit numbers (hashes in real files).
    pub cats: [Option<u32>; CATEGORICAL],
}

/// What a reader saw.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct TsvStats {
    /// Lines read.
    pub lines: u64,
    /// Records returned.
    pub records: u64,
    /// Lines skipped as malformed.
    pub malformed: u64,
    /// Malformed lines by reason.
    pub reasons: BTreeMap<&'static str, u64>,
    /// The first few malformed lines: line number and what was wrong.
    pub examples: Vec<(u64, String)>,
}

/// Longest line accepted, in bytes.
pub const MAX_LINE: usize = 64 << 10;

/// Reads Criteo TSV records, skipping and counting malformed lines.
pub struct TsvReader<R> {
    inner: R,
    line: Vec<u8>,
    /// What was read so far.
    pub stats: TsvStats,
}

impl<R: BufRead> TsvReader<R> {
    /// A reader over `inner`.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            line: Vec::new(),
            stats: TsvStats::default(),
        }
    }

    fn reject(&mut self, reason: &'static str, detail: String) {
        self.stats.malformed += 1;
        *self.stats.reasons.entry(reason).or_default() += 1;
        if self.stats.examples.len() < 10 {
            self.stats.examples.push((self.stats.lines, detail));
        }
    }

    fn parse(line: &str) -> Result<TsvRecord, (&'static str, String)> {
        let fields: Vec<&str> = line.split('\t').collect();
        if fields.len() != 1 + DENSE + CATEGORICAL {
            return Err((
                "field count",
                format!("{} fields, expected 40", fields.len()),
            ));
        }
        let label = match fields[0] {
            "0" => false,
            "1" => true,
            other => return Err(("label", format!("label {other:?}"))),
        };
        let mut dense = [None; DENSE];
        for (d, text) in dense.iter_mut().zip(&fields[1..1 + DENSE]) {
            if !text.is_empty() {
                *d = Some(
                    text.parse::<i64>()
                        .map_err(|_| ("dense value", format!("dense {text:?}")))?,
                );
            }
        }
        let mut cats = [None; CATEGORICAL];
        for (c, text) in cats.iter_mut().zip(&fields[1 + DENSE..]) {
            if !text.is_empty() {
                if text.len() > 8 {
                    return Err(("categorical value", format!("categorical {text:?}")));
                }
                *c = Some(
                    u32::from_str_radix(text, 16)
                        .map_err(|_| ("categorical value", format!("categorical {text:?}")))?,
                );
            }
        }
        Ok(TsvRecord { label, dense, cats })
    }
}

impl<R: BufRead> Iterator for TsvReader<R> {
    type Item = io::Result<TsvRecord>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            self.line.clear();
            match Read::take(&mut self.inner, MAX_LINE as u64 + 1).read_until(b'\n', &mut self.line)
            {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) => return Some(Err(e)),
            }
            self.stats.lines += 1;
            if self.line.len() > MAX_LINE && !self.line.ends_with(b"\n") {
                // Skip the rest of an overlong line.
                let mut rest = Vec::new();
                loop {
                    rest.clear();
                    match Read::take(&mut self.inner, MAX_LINE as u64).read_until(b'\n', &mut rest)
                    {
                        Ok(0) => break,
                        Ok(_) if rest.ends_with(b"\n") => break,
                        Ok(_) => continue,
                        Err(e) => return Some(Err(e)),
                    }
                }
                self.reject("too long", format!("line over {MAX_LINE} bytes"));
                continue;
            }
            let bytes = self.line.strip_suffix(b"\n").unwrap_or(&self.line);
            let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
            let text = match std::str::from_utf8(bytes) {
                Ok(t) => t,
                Err(_) => {
                    self.reject("encoding", "not UTF-8".into());
                    continue;
                }
            };
            match Self::parse(text) {
                Ok(record) => {
                    self.stats.records += 1;
                    return Some(Ok(record));
                }
                Err((reason, detail)) => self.reject(reason, detail),
            }
        }
    }
}

/// `hetkv-bench criteo` settings.
#[derive(clap::Args, Debug, Clone)]
pub struct CriteoArgs {
    /// Samples to generate.
    #[arg(long, default_value_t = 200_000)]
    pub samples: usize,
    /// Cardinality scale (1.0 = Criteo Kaggle's 33.76M ids).
    #[arg(long, default_value_t = 0.01)]
    pub scale: f64,
    /// Seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Also write the samples as Criteo TSV here (and read them back through the reader).
    #[arg(long)]
    pub tsv: Option<std::path::PathBuf>,
    /// Write the report here as JSON.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

/// What `hetkv-bench criteo` measured.
#[derive(Debug, serde::Serialize)]
pub struct CriteoReport {
    /// Samples generated.
    pub samples: usize,
    /// Cardinality scale.
    pub scale: f64,
    /// Rows of the embedding table holding every field.
    pub table_rows: u64,
    /// Ids per field (C1..C26), each field also owning one row for "missing".
    pub field_ids: Vec<u64>,
    /// Click rate of the generated labels.
    pub ctr: f64,
    /// The planted model's AUC on these samples (the ceiling a model can approach).
    pub oracle_auc: f64,
    /// The planted model's logloss.
    pub oracle_logloss: f64,
    /// Logloss of predicting the mean click rate.
    pub mean_ctr_logloss: f64,
    /// The reader's account of the TSV file, when one was written.
    pub tsv: Option<TsvStats>,
}

/// Generates a data set and reports the planted model's ceiling.
pub fn run(args: &CriteoArgs) -> Result<CriteoReport> {
    let mut g = CriteoSynth::new(args.scale, args.seed)?;
    let mut out = match &args.tsv {
        Some(path) => Some(io::BufWriter::new(std::fs::File::create(path)?)),
        None => None,
    };
    let (mut labels, mut p) = (
        Vec::with_capacity(args.samples),
        Vec::with_capacity(args.samples),
    );
    let bar = crate::progress::bar(args.samples as u64, "generating samples");
    for _ in 0..args.samples {
        bar.inc(1);
        let s = g.sample();
        if let Some(w) = out.as_mut() {
            write_tsv(w, &s)?;
        }
        labels.push(s.label);
        p.push(s.p);
    }
    bar.finish_and_clear();
    if let Some(mut w) = out {
        w.flush()?;
    }
    let tsv = match &args.tsv {
        Some(path) => {
            let mut r = TsvReader::new(io::BufReader::new(std::fs::File::open(path)?));
            for record in r.by_ref() {
                record?;
            }
            ensure!(
                r.stats.records == args.samples as u64 && r.stats.malformed == 0,
                "reading back {}: {:?}",
                path.display(),
                r.stats
            );
            Some(r.stats)
        }
        None => None,
    };
    let ctr = labels.iter().filter(|&&l| l).count() as f64 / args.samples.max(1) as f64;
    Ok(CriteoReport {
        samples: args.samples,
        scale: args.scale,
        table_rows: g.table_rows(),
        field_ids: (0..CATEGORICAL).map(|f| g.field_ids(f)).collect(),
        ctr,
        oracle_auc: crate::metrics::auc(&p, &labels).unwrap_or(f64::NAN),
        oracle_logloss: crate::metrics::logloss(&p, &labels),
        mean_ctr_logloss: crate::metrics::logloss(&vec![ctr; labels.len()], &labels),
        tsv,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{auc, logloss};

    #[test]
    fn planted_ctr_is_criteos_and_the_oracle_is_informative() {
        let mut g = CriteoSynth::new(0.01, 7).unwrap();
        let n = 100_000;
        let samples: Vec<Sample> = (0..n).map(|_| g.sample()).collect();
        let labels: Vec<bool> = samples.iter().map(|s| s.label).collect();
        let p: Vec<f64> = samples.iter().map(|s| s.p).collect();
        let ctr = labels.iter().filter(|&&l| l).count() as f64 / n as f64;
        assert!((ctr - CRITEO_CTR).abs() < 0.005, "planted CTR {ctr}");
        let oracle_auc = auc(&p, &labels).unwrap();
        let oracle_logloss = logloss(&p, &labels);
        let mean_logloss = logloss(&vec![ctr; n], &labels);
        println!(
            "planted CTR {:.4}, oracle AUC {oracle_auc:.4}, oracle logloss {oracle_logloss:.4}, mean-CTR logloss {mean_logloss:.4}",
            ctr
        );
        assert!(
            oracle_auc > 0.75 && oracle_auc < 0.95,
            "oracle AUC {oracle_auc}"
        );
        assert!(
            oracle_logloss < mean_logloss - 0.05,
            "the planted model beats the mean"
        );
    }

    #[test]
    fn generation_is_deterministic_by_seed_and_keys_stay_in_their_fields() {
        let mut a = CriteoSynth::new(0.001, 3).unwrap();
        let mut b = CriteoSynth::new(0.001, 3).unwrap();
        let mut c = CriteoSynth::new(0.001, 4).unwrap();
        let (sa, sb, sc): (Vec<_>, Vec<_>, Vec<_>) = (
            (0..200).map(|_| a.sample()).collect(),
            (0..200).map(|_| b.sample()).collect(),
            (0..200).map(|_| c.sample()).collect(),
        );
        assert_eq!(sa, sb);
        assert_ne!(sa, sc);
        for s in &sa {
            for (f, &id) in s.ids.iter().enumerate() {
                assert!((id as u64) < a.field_ids(f));
                let key = a.key(f, Some(id));
                assert!(key < a.table_rows());
                assert!(f == 0 || key > a.key(f - 1, None), "fields do not overlap");
            }
        }
    }

    #[test]
    fn the_biggest_fields_are_heavily_skewed() {
        // C3 at scale 0.01: about 101k ids; the hottest 1% carry most lookups.
        let mut g = CriteoSynth::new(0.01, 11).unwrap();
        let mut counts = std::collections::HashMap::new();
        let n = 50_000;
        for _ in 0..n {
            *counts.entry(g.sample().ids[2]).or_insert(0u64) += 1;
        }
        let mut c: Vec<u64> = counts.into_values().collect();
        c.sort_unstable_by(|a, b| b.cmp(a));
        let top = (g.field_ids(2) / 100) as usize;
        let share = c.iter().take(top).sum::<u64>() as f64 / n as f64;
        assert!(share > 0.6, "top 1% of C3 carries {share:.2} of lookups");
    }

    #[test]
    fn tsv_round_trips() {
        let mut g = CriteoSynth::new(0.001, 5).unwrap();
        let samples: Vec<Sample> = (0..500).map(|_| g.sample()).collect();
        let mut buf = Vec::new();
        for s in &samples {
            write_tsv(&mut buf, s).unwrap();
        }
        let mut r = TsvReader::new(&buf[..]);
        let records: Vec<TsvRecord> = r.by_ref().map(|x| x.unwrap()).collect();
        assert_eq!(records.len(), 500);
        assert_eq!(r.stats.malformed, 0);
        for (s, rec) in samples.iter().zip(&records) {
            assert_eq!(rec.label, s.label);
            assert!(rec
                .dense
                .iter()
                .zip(&s.dense)
                .all(|(a, &b)| *a == Some(b as i64)));
            assert!(rec.cats.iter().zip(&s.ids).all(|(a, &b)| *a == Some(b)));
            for f in 0..CATEGORICAL {
                assert_eq!(g.key(f, rec.cats[f]), g.key(f, Some(s.ids[f])));
            }
        }
    }

    #[test]
    fn malformed_lines_are_counted_by_reason_and_missing_fields_are_not_malformed() {
        let good = {
            let mut b = Vec::new();
            write_tsv(&mut b, &CriteoSynth::new(0.001, 1).unwrap().sample()).unwrap();
            String::from_utf8(b).unwrap()
        };
        let missing = format!("0{}{}\n", "\t".repeat(DENSE), "\t".repeat(CATEGORICAL));
        let mut file = Vec::new();
        file.extend_from_slice(good.as_bytes());
        file.extend_from_slice(b"1\t2\t3\n"); // field count
        file.extend_from_slice(good.replacen('0', "7", 1).replacen('1', "7", 1).as_bytes()); // label
        file.extend_from_slice(missing.as_bytes()); // fine: every field missing
        file.extend_from_slice(missing.replacen("\t", "\tx", 1).as_bytes()); // dense value
        file.extend_from_slice(good.replace('\n', "\tzz\n").as_bytes()); // 41 fields
        let mut bad_hex = missing.clone();
        bad_hex.insert_str(bad_hex.len() - 1, "zz");
        file.extend_from_slice(bad_hex.as_bytes()); // categorical value
        file.extend_from_slice(&[0xff, 0xfe, b'\n']); // encoding
        file.extend_from_slice(&vec![b'1'; MAX_LINE + 10]); // too long, no newline
        file.push(b'\n');
        file.extend_from_slice(good.trim_end().as_bytes()); // last line without a newline: fine
        let mut r = TsvReader::new(&file[..]);
        let records: Vec<TsvRecord> = r.by_ref().map(|x| x.unwrap()).collect();
        assert_eq!(records.len(), 3, "{:?}", r.stats);
        assert_eq!(records[1].cats, [None; CATEGORICAL]);
        let s = &r.stats;
        assert_eq!((s.lines, s.records, s.malformed), (10, 3, 7), "{s:?}");
        for (reason, n) in [
            ("field count", 2),
            ("label", 1),
            ("dense value", 1),
            ("categorical value", 1),
            ("encoding", 1),
            ("too long", 1),
        ] {
            assert_eq!(s.reasons.get(reason), Some(&n), "{reason}: {s:?}");
        }
    }
}
