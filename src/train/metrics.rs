//! Retrieval and generation metrics, and the table `eval` prints.

use std::fmt;

/// Fraction of the first `k` ranked items that are relevant; 0 when `k` is 0.
///
/// A ranking shorter than `k` counts the missing places as misses.
pub fn precision_at_k(ranked: &[usize], k: usize, relevant: impl Fn(usize) -> bool) -> f32 {
    if k == 0 {
        return 0.0;
    }
    let hits = ranked.iter().take(k).filter(|&&i| relevant(i)).count();
    hits as f32 / k as f32
}

/// Indices of the `k` largest scores, best first; ties keep the lower index first.
pub fn top_k(scores: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    order.truncate(k);
    order
}

/// Exact-match accuracy counter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Accuracy {
    /// Predictions equal to the reference.
    pub correct: usize,
    /// Predictions scored.
    pub total: usize,
}

impl Accuracy {
    /// Scores one prediction; comparison ignores surrounding whitespace.
    pub fn add(&mut self, predicted: &str, expected: &str) {
        self.total += 1;
        if predicted.trim() == expected.trim() {
            self.correct += 1;
        }
    }

    /// `correct / total`, or 0 when nothing was scored.
    pub fn value(&self) -> f32 {
        if self.total == 0 {
            0.0
        } else {
            self.correct as f32 / self.total as f32
        }
    }
}

/// Precision@k of one text query, before and after ITM rerank.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryPrecision {
    /// The query text.
    pub query: String,
    /// Number of gallery images whose caption equals the query.
    pub relevant: usize,
    /// Precision@k ranking by ITC similarity.
    pub itc: f32,
    /// Precision@k after reranking the ITC top candidates by the ITM match logit.
    pub itm: f32,
}

/// Everything `eval` measures.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EvalReport {
    /// The k of precision@k.
    pub k: usize,
    /// ITC candidates reranked by ITM per query.
    pub rerank_k: usize,
    /// Images in the gallery.
    pub images: usize,
    /// One row per query.
    pub queries: Vec<QueryPrecision>,
    /// Caption exact-match accuracy.
    pub caption: Accuracy,
    /// VQA exact-match accuracy.
    pub vqa: Accuracy,
}

impl EvalReport {
    /// Mean ITC precision@k over the queries (0 without queries).
    pub fn mean_itc(&self) -> f32 {
        mean(self.queries.iter().map(|q| q.itc))
    }

    /// Mean precision@k after ITM rerank over the queries (0 without queries).
    pub fn mean_itm(&self) -> f32 {
        mean(self.queries.iter().map(|q| q.itm))
    }
}

fn mean(values: impl Iterator<Item = f32>) -> f32 {
    let (sum, count) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if count == 0 {
        0.0
    } else {
        sum / count as f32
    }
}

impl fmt::Display for EvalReport {
    /// A Markdown table: one row per query, then the means and the generation accuracies.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (k, rk) = (self.k, self.rerank_k);
        writeln!(
            f,
            "| query | relevant | P@{k} ITC | P@{k} ITM rerank (top {rk}) |"
        )?;
        writeln!(f, "|---|---:|---:|---:|")?;
        for q in &self.queries {
            writeln!(
                f,
                "| {} | {} | {:.3} | {:.3} |",
                q.query, q.relevant, q.itc, q.itm
            )?;
        }
        writeln!(
            f,
            "| **mean** ({} images) | | **{:.3}** | **{:.3}** |",
            self.images,
            self.mean_itc(),
            self.mean_itm()
        )?;
        writeln!(f)?;
        writeln!(f, "| generation | correct | total | accuracy |")?;
        writeln!(f, "|---|---:|---:|---:|")?;
        for (name, acc) in [("caption exact match", self.caption), ("VQA", self.vqa)] {
            let value = acc.value();
            writeln!(
                f,
                "| {name} | {} | {} | {value:.4} |",
                acc.correct, acc.total
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precision_counts_short_rankings_as_misses() {
        let relevant = |i: usize| i.is_multiple_of(2);
        assert_eq!(precision_at_k(&[0, 2, 1, 4], 4, relevant), 0.75);
        assert_eq!(precision_at_k(&[0, 2], 4, relevant), 0.5);
        assert_eq!(precision_at_k(&[0], 0, relevant), 0.0);
    }

    #[test]
    fn top_k_orders_by_score_then_index() {
        assert_eq!(top_k(&[0.1, 0.9, 0.5, 0.9], 3), [1, 3, 2]);
        assert_eq!(top_k(&[0.1], 5), [0]);
    }

    #[test]
    fn report_table_shows_means_and_accuracies() {
        let mut report = EvalReport {
            k: 10,
            rerank_k: 30,
            images: 4,
            ..Default::default()
        };
        for (query, itc, itm) in [("a red circle", 1.0, 1.0), ("a blue circle", 0.5, 0.9)] {
            report.queries.push(QueryPrecision {
                query: query.into(),
                relevant: 2,
                itc,
                itm,
            });
        }
        report.vqa.add("yes", "yes");
        report.vqa.add("no ", "yes");
        let table = report.to_string();
        assert!(table.contains("**0.750** | **0.950**"), "{table}");
        assert!(table.contains("| VQA | 1 | 2 | 0.5000 |"), "{table}");
    }
}
