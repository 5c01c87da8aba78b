//! Vector checks and arithmetic shared by upserts, searches and the graph distance.

use std::sync::OnceLock;

use crate::error::{Error, Result};
use crate::hnsw::distance::Dot;
use crate::types::Metric;

/// Largest norm accepted for inner-product vectors; leaves room for rounding of unit vectors.
const MAX_INNER_PRODUCT_NORM: f32 = 1.0 + 1e-3;

/// Inner product with the fastest kernel the CPU supports.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    static KERNEL: OnceLock<Dot> = OnceLock::new();
    KERNEL.get_or_init(Dot::detect).call(a, b)
}

/// Checks a vector and returns the form stored or searched, plus its original norm.
///
/// For [`Metric::Cosine`] the result has unit length. For [`Metric::InnerProduct`] stored
/// vectors are kept as given (norm at most one) while queries are normalised, since scaling
/// a query does not change the ranking; the caller multiplies scores by the returned norm.
pub fn prepare(
    id: &str,
    vector: &[f32],
    dimension: usize,
    metric: Metric,
    is_query: bool,
) -> Result<(Vec<f32>, f32)> {
    if vector.len() != dimension {
        return Err(Error::WrongDimension {
            id: id.to_string(),
            got: vector.len(),
            expected: dimension,
        });
    }
    if let Some(position) = vector.iter().position(|x| !x.is_finite()) {
        return Err(Error::NonFinite {
            id: id.to_string(),
            position,
        });
    }

    // In f64, so that finite components far from 1 neither overflow nor vanish when squared.
    let exact = vector
        .iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt();
    if exact == 0.0 {
        return Err(Error::ZeroVector { id: id.to_string() });
    }
    let norm = exact as f32;
    let keep = metric == Metric::InnerProduct && !is_query;
    if keep && norm > MAX_INNER_PRODUCT_NORM {
        return Err(Error::NormTooLarge {
            id: id.to_string(),
            norm,
        });
    }

    let prepared = if keep {
        vector.to_vec()
    } else {
        vector
            .iter()
            .map(|&x| (f64::from(x) / exact) as f32)
            .collect()
    };
    Ok((prepared, norm))
}

/// Little-endian bytes of a vector, as stored.
pub fn to_bytes(vector: &[f32]) -> Vec<u8> {
    vector.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Decodes stored bytes; `None` when the length does not match the dimension.
pub fn from_bytes(bytes: &[u8], dimension: usize) -> Option<Vec<f32>> {
    if bytes.len() != dimension * 4 {
        return None;
    }
    let vector = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Some(vector)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_naive_sum_for_odd_lengths() {
        let a: Vec<f32> = (0..19).map(|i| i as f32 * 0.5).collect();
        let b: Vec<f32> = (0..19).map(|i| 1.0 - i as f32 * 0.1).collect();
        let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - naive).abs() < 1e-3);
    }

    #[test]
    fn cosine_vectors_are_normalised() {
        let (v, norm) = prepare("a", &[3.0, 4.0], 2, Metric::Cosine, false).unwrap();
        assert!((norm - 5.0).abs() < 1e-6);
        assert!((dot(&v, &v) - 1.0).abs() < 1e-6);
    }

    #[test]
    fn finite_vectors_of_extreme_magnitude_are_normalised() {
        for scale in [3e38f32, 1e-40] {
            let (v, _) = prepare("a", &[scale; 32], 32, Metric::Cosine, false).unwrap();
            assert!((dot(&v, &v) - 1.0).abs() < 1e-5, "scale {scale}");
        }
    }

    #[test]
    fn invalid_vectors_are_rejected_with_the_reason() {
        let wrong = prepare("a", &[1.0], 2, Metric::Cosine, false);
        assert!(matches!(
            wrong,
            Err(Error::WrongDimension {
                got: 1,
                expected: 2,
                ..
            })
        ));
        let nan = prepare("a", &[1.0, f32::NAN], 2, Metric::Cosine, false);
        assert!(matches!(nan, Err(Error::NonFinite { position: 1, .. })));
        let zero = prepare("a", &[0.0, 0.0], 2, Metric::Cosine, false);
        assert!(matches!(zero, Err(Error::ZeroVector { .. })));
        let long = prepare("a", &[3.0, 4.0], 2, Metric::InnerProduct, false);
        assert!(matches!(long, Err(Error::NormTooLarge { .. })));
    }

    #[test]
    fn bytes_round_trip_and_reject_wrong_length() {
        let v = vec![0.25f32, -1.5, 3.0];
        assert_eq!(from_bytes(&to_bytes(&v), 3), Some(v));
        assert_eq!(from_bytes(&[0u8; 5], 3), None);
    }
}
