//! Validation of request fields and conversions between API and index types.

use std::collections::BTreeMap;
use std::collections::HashMap;

use mplug_index::ItemKind;

use super::proto;
use super::settings::Limits;
use crate::{Error, Result};

/// `Error::InvalidArgument` for `field`.
pub fn invalid(field: &str, reason: impl Into<String>) -> Error {
    Error::InvalidArgument {
        field: field.into(),
        reason: reason.into(),
    }
}

/// The API kind of an index kind.
pub fn kind_to_proto(kind: ItemKind) -> proto::ItemKind {
    match kind {
        ItemKind::Image => proto::ItemKind::Image,
        ItemKind::Text => proto::ItemKind::Text,
    }
}

/// The index kinds of a request's target kinds; `None` for an empty list (all kinds).
pub fn target_kinds(values: &[i32]) -> Result<Option<Vec<ItemKind>>> {
    if values.is_empty() {
        return Ok(None);
    }
    let mut kinds = Vec::new();
    for &value in values {
        let kind = match proto::ItemKind::try_from(value) {
            Ok(proto::ItemKind::Image) => ItemKind::Image,
            Ok(proto::ItemKind::Text) => ItemKind::Text,
            _ => {
                let reason = format!("{value} is not ITEM_KIND_IMAGE (1) or ITEM_KIND_TEXT (2)");
                return Err(invalid("target_kinds", reason));
            }
        };
        if !kinds.contains(&kind) {
            kinds.push(kind);
        }
    }
    Ok(Some(kinds))
}

/// Checks a text: non-empty after trimming and within the byte limit.
pub fn text(field: &str, value: &str, limits: &Limits) -> Result<()> {
    if value.trim().is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if value.len() > limits.max_text_bytes {
        let reason = format!(
            "{} bytes exceeds the limit of {} bytes",
            value.len(),
            limits.max_text_bytes
        );
        return Err(invalid(field, reason));
    }
    Ok(())
}

/// Checks an item id: 1 to `mplug_index::MAX_ID_BYTES` bytes, no control characters.
pub fn item_id(field: &str, id: &str) -> Result<()> {
    if id.is_empty() || id.len() > mplug_index::MAX_ID_BYTES {
        let reason = format!(
            "expected 1 to {} bytes, got {}",
            mplug_index::MAX_ID_BYTES,
            id.len()
        );
        return Err(invalid(field, reason));
    }
    if id.chars().any(char::is_control) {
        return Err(invalid(
            field,
            format!("{id:?} contains control characters"),
        ));
    }
    Ok(())
}

/// Checks and orders metadata: at most the entry limit, keys non-empty, every key and
/// value within the text limit, and all keys and values together within the metadata byte
/// limit.
pub fn metadata(
    field: &str,
    values: HashMap<String, String>,
    limits: &Limits,
) -> Result<BTreeMap<String, String>> {
    if values.len() > limits.max_metadata_entries {
        let reason = format!(
            "{} entries exceeds the limit of {}",
            values.len(),
            limits.max_metadata_entries
        );
        return Err(invalid(field, reason));
    }
    let mut total = 0;
    for (key, value) in &values {
        if key.is_empty() {
            return Err(invalid(field, "keys must not be empty"));
        }
        if key.len() + value.len() > limits.max_text_bytes {
            let reason = format!(
                "entry {} has {} bytes, exceeding the limit of {} bytes per entry",
                quoted_start(key),
                key.len() + value.len(),
                limits.max_text_bytes
            );
            return Err(invalid(field, reason));
        }
        total += key.len() + value.len();
    }
    if total > limits.max_metadata_bytes {
        let reason = format!(
            "keys and values total {total} bytes, exceeding the limit of {} bytes",
            limits.max_metadata_bytes
        );
        return Err(invalid(field, reason));
    }
    Ok(values.into_iter().collect())
}

/// `text` quoted for an error message, cut after its first 64 characters (marked `…`) so
/// that a message naming client input stays small.
fn quoted_start(text: &str) -> String {
    const SHOWN: usize = 64;
    match text.char_indices().nth(SHOWN) {
        Some((cut, _)) => format!("{:?}…", &text[..cut]),
        None => format!("{text:?}"),
    }
}

/// Checks `k`: 1 to the limit.
pub fn k(value: u32, limits: &Limits) -> Result<usize> {
    let value = value as usize;
    if value == 0 || value > limits.max_k {
        let reason = format!("expected 1..={}, got {value}", limits.max_k);
        return Err(invalid("k", reason));
    }
    Ok(value)
}

/// The number of candidates to rerank, `k..=max_rerank_k`: the request's value, or for 0
/// `max(k, default_rerank_k)`. A reranked search therefore asks for at most `max_rerank_k`
/// hits: a larger `k` is refused (field `k`) rather than reranking more candidates than the
/// limit allows; a `rerank_k` outside the range is refused (field `rerank_k`).
pub fn rerank_k(value: u32, k: usize, limits: &Limits) -> Result<usize> {
    let max = limits.max_rerank_k;
    if k > max {
        let reason = format!(
            "{k} exceeds the limit of {max} for a reranked search; lower k or search without \
             rerank"
        );
        return Err(invalid("k", reason));
    }
    let value = match value as usize {
        0 => k.max(limits.default_rerank_k).min(max),
        v => v,
    };
    if value < k || value > max {
        let reason = format!("expected {k}..={max}, got {value}");
        return Err(invalid("rerank_k", reason));
    }
    Ok(value)
}

/// BLAKE3 hash of an item's content, distinct for an image and a text of the same bytes.
pub fn content_hash(kind: ItemKind, bytes: &[u8]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(match kind {
        ItemKind::Image => b"image\0",
        ItemKind::Text => b"text\0\0",
    });
    hasher.update(bytes);
    *hasher.finalize().as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn k_and_rerank_k_bounds() {
        let limits = Limits::default();
        assert!(k(0, &limits).is_err());
        assert!(k(u32::MAX, &limits).is_err());
        assert_eq!(k(5, &limits).expect("5 is valid"), 5);

        assert_eq!(rerank_k(0, 5, &limits).expect("default"), 32);
        assert_eq!(rerank_k(0, 100, &limits).expect("k above the default"), 100);
        assert_eq!(rerank_k(0, 256, &limits).expect("k at the cap"), 256);
        assert!(rerank_k(3, 5, &limits).is_err());
        assert!(rerank_k(10_000, 5, &limits).is_err());
    }

    #[test]
    fn rerank_never_exceeds_max_rerank_k_even_when_k_is_larger() {
        let limits = Limits::default();
        for rerank in [0, 300, 1000] {
            let error = rerank_k(rerank, 1000, &limits).expect_err("k above max_rerank_k");
            assert!(
                matches!(&error, Error::InvalidArgument { field, .. } if field == "k"),
                "{error}"
            );
            assert!(error.to_string().contains("256"), "{error}");
        }
    }

    #[test]
    fn metadata_is_bounded_in_entries_and_in_total_bytes() {
        let limits = Limits::default();
        let entries = |count: usize, bytes: usize| -> HashMap<String, String> {
            (0..count)
                .map(|i| (format!("k{i:02}"), "v".repeat(bytes)))
                .collect()
        };
        assert!(metadata("metadata", entries(4, 1000), &limits).is_ok());
        let error = metadata("metadata", entries(64, 16_000), &limits).expect_err("1 MB");
        assert!(error.to_string().contains("16384"), "{error}");
        assert!(metadata("metadata", entries(65, 1), &limits).is_err());

        let huge_key = HashMap::from([("k".repeat(20_000), "v".to_string())]);
        let error = metadata("filter", huge_key, &limits).expect_err("over one entry's limit");
        let message = error.to_string();
        assert!(
            message.contains("20001 bytes") && message.contains("16384"),
            "{message}"
        );
        assert!(message.len() < 300, "the key is quoted in part: {message}");
    }

    #[test]
    fn texts_must_be_non_empty_and_bounded() {
        let limits = Limits::default();
        assert!(text("text", " \n", &limits).is_err());
        assert!(text("text", &"a".repeat(limits.max_text_bytes + 1), &limits).is_err());
        assert!(text("text", "a red circle", &limits).is_ok());
    }

    #[test]
    fn unknown_target_kinds_are_rejected() {
        assert_eq!(target_kinds(&[]).expect("empty is all"), None);
        assert_eq!(
            target_kinds(&[1, 1]).expect("valid"),
            Some(vec![ItemKind::Image])
        );
        assert!(target_kinds(&[0]).is_err());
        assert!(target_kinds(&[7]).is_err());
    }

    #[test]
    fn content_hash_separates_kinds() {
        let a = content_hash(ItemKind::Image, b"x");
        assert_ne!(a, content_hash(ItemKind::Text, b"x"));
        assert_eq!(a, content_hash(ItemKind::Image, b"x"));
    }
}
