//! Classification metrics for CTR models: AUC and logloss.

/// Area under the ROC curve of `scores` against 0/1 `labels` (Mann-Whitney U with ties counted as
/// half). `None` when one class is missing.
pub fn auc(scores: &[f64], labels: &[bool]) -> Option<f64> {
    assert_eq!(scores.len(), labels.len(), "one label per score");
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let positives = labels.iter().filter(|&&l| l).count() as f64;
    let negatives = labels.len() as f64 - positives;
    if positives == 0.0 || negatives == 0.0 {
        return None;
    }
    // Sum of the (average, 1-based) ranks of the positives.
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        let average_rank = (i + j) as f64 / 2.0 + 1.0;
        rank_sum += (i..=j).filter(|&k| labels[order[k]]).count() as f64 * average_rank;
        i = j + 1;
    }
    Some((rank_sum - positives * (positives + 1.0) / 2.0) / (positives * negatives))
}

/// Mean binary cross-entropy of probabilities `p` against `labels`, with `p` clamped to
/// `[1e-7, 1 - 1e-7]`.
pub fn logloss(p: &[f64], labels: &[bool]) -> f64 {
    assert_eq!(p.len(), labels.len(), "one label per probability");
    let sum: f64 = p
        .iter()
        .zip(labels)
        .map(|(&p, &y)| {
            let p = p.clamp(1e-7, 1.0 - 1e-7);
            if y {
                -p.ln()
            } else {
                -(1.0 - p).ln()
            }
        })
        .sum();
    sum / p.len().max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_of_known_orderings() {
        let labels = [false, false, true, true];
        assert_eq!(auc(&[0.1, 0.2, 0.3, 0.4], &labels), Some(1.0));
        assert_eq!(auc(&[0.4, 0.3, 0.2, 0.1], &labels), Some(0.0));
        assert_eq!(auc(&[0.5; 4], &labels), Some(0.5), "all tied");
        // One positive below one negative: 3 of 4 pairs ordered.
        assert_eq!(auc(&[0.1, 0.35, 0.3, 0.4], &labels), Some(0.75));
        assert_eq!(auc(&[0.1, 0.2], &[true, true]), None);
    }

    #[test]
    fn logloss_of_known_predictions() {
        let l = logloss(&[0.5, 0.5], &[true, false]);
        assert!((l - std::f64::consts::LN_2).abs() < 1e-12);
        assert!(logloss(&[1.0, 0.0], &[true, false]) < 1e-6);
        assert!(logloss(&[0.0], &[true]) > 16.0, "clamped, not infinite");
    }
}
