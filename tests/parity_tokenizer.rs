//! The tokenizer against every case of `tests/fixtures/parity/tokenizer.goldens.json`
//! (reference `BertTokenizer` of transformers 4.14.1 with mPLUG's `pre_caption`).

use std::path::Path;

use mplug_search::model::MplugConfig;
use mplug_search::preprocess::{pre_caption, MplugTokenizer};
use serde_json::Value;

fn setup() -> (MplugTokenizer, Value) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity");
    let cfg = MplugConfig::from_file(&dir.join("tiny_base.mplug.json")).expect("config loads");
    let tok = MplugTokenizer::from_config(&cfg.tokenizer).expect("tokenizer builds");
    let text = std::fs::read_to_string(dir.join("tokenizer.goldens.json")).expect("goldens");
    (tok, serde_json::from_str(&text).expect("goldens parse"))
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

#[test]
fn retrieval_mode_matches_every_golden() {
    let (tok, gold) = setup();
    for case in gold["cases"].as_array().expect("cases") {
        let text = case["text"].as_str().expect("text");
        let r = &case["retrieval"];
        assert_eq!(
            pre_caption(text, 30),
            r["pre_caption_30"].as_str().unwrap(),
            "{text:?}"
        );
        let batch = tok.encode_retrieval(&[text]).expect("encodes");
        assert_eq!(
            batch.ids[0],
            u32s(&r["input_ids"]),
            "retrieval ids of {text:?}"
        );
        assert_eq!(
            batch.mask[0],
            u32s(&r["attention_mask"]),
            "retrieval mask of {text:?}"
        );
    }
}

#[test]
fn raw_mode_matches_every_golden() {
    let (tok, gold) = setup();
    for case in gold["cases"].as_array().expect("cases") {
        let text = case["text"].as_str().expect("text");
        let r = &case["raw"];
        let batch = tok.encode_question(&[text], false).expect("encodes");
        let ids = u32s(&r["input_ids"]);
        assert_eq!(batch.ids[0], ids, "raw ids of {text:?}");
        assert_eq!(
            tok.decode_raw(&ids),
            r["decode"].as_str().unwrap(),
            "decode of {text:?}"
        );
        assert_eq!(
            tok.decode(&ids),
            r["decode_cleaned"].as_str().unwrap(),
            "{text:?}"
        );
    }
}

#[test]
fn decode_cases_match() {
    let (tok, gold) = setup();
    for case in gold["decode_cases"].as_array().expect("decode cases") {
        let ids = u32s(&case["ids"]);
        assert_eq!(tok.decode_raw(&ids), case["decode"].as_str().unwrap());
        assert_eq!(tok.decode(&ids), case["decode_cleaned"].as_str().unwrap());
    }
}

#[test]
fn questions_pad_to_longest_and_truncate_on_request() {
    let (tok, _) = setup();
    let batch = tok
        .encode_question(&["what is it", "a b c d e f g h"], false)
        .unwrap();
    assert_eq!(batch.ids[0].len(), batch.ids[1].len());
    assert_eq!(batch.mask[0].iter().sum::<u32>(), 4);
    let long = "word ".repeat(40);
    let cut = tok.encode_question(&[long.as_str()], true).unwrap();
    assert_eq!(cut.ids[0].len(), 25);
    let target = tok.encode_target(&["yes"], None).unwrap();
    assert_eq!(target.ids[0], vec![101, 2748, 102]);
}
