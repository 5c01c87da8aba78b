//! Parity with the reference PyTorch mPLUG on the tiny fixtures (see
//! `tests/fixtures/parity/README.md`): both configs, both file formats.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor};
use mplug_search::model::vision::resize_pos_embed;
use mplug_search::model::{Hypothesis, Mplug, Tasks};

const TOL: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/parity")
        .join(name)
}

struct Case {
    model: Mplug,
    gold: HashMap<String, Tensor>,
    label: String,
}

fn load(cfg: &str, ext: &str) -> Case {
    let ckpt = fixture(&format!("{cfg}.{ext}"));
    let config = fixture(&format!("{cfg}.mplug.json"));
    let (model, report) =
        Mplug::load_with_report(&ckpt, &config, Tasks::ALL, &Device::Cpu, DType::F32)
            .expect("fixture checkpoint loads");
    assert!(
        report.unused.is_empty(),
        "{cfg}.{ext}: unused tensors {:?}",
        report.unused
    );
    let gold = candle_core::safetensors::load(
        fixture(&format!("{cfg}.goldens.safetensors")),
        &Device::Cpu,
    )
    .expect("goldens load");
    Case {
        model,
        gold,
        label: format!("{cfg}.{ext}"),
    }
}

impl Case {
    fn g(&self, name: &str) -> &Tensor {
        self.gold
            .get(name)
            .unwrap_or_else(|| panic!("golden {name} missing"))
    }

    /// An int64 golden index list as a u32 tensor, ready for `index_select`.
    fn indices(&self, name: &str) -> Tensor {
        self.g(name).to_dtype(DType::U32).unwrap()
    }

    fn close(&self, name: &str, got: &Tensor) -> f32 {
        let want = self.g(name);
        assert_eq!(got.dims(), want.dims(), "{}: {name} shape", self.label);
        let diff = (got.to_dtype(DType::F32).unwrap() - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        println!("{}: {name} max|diff| = {diff:.3e}", self.label);
        assert!(diff <= TOL, "{}: {name} differs by {diff}", self.label);
        diff
    }

    fn ids(&self, name: &str) -> Vec<Vec<i64>> {
        self.g(name).to_vec2::<i64>().unwrap()
    }
}

fn check_encoders(c: &Case) -> (Tensor, Tensor) {
    let m = &c.model;
    let pixels = c.g("pixel_values");
    c.close("vision.ln_pre", &m.vision_embed(pixels).unwrap());
    c.close("vision.ln_post", &m.vision_tower(pixels).unwrap());
    let v = m.encode_image(pixels).unwrap();
    c.close("V", &v);
    let (ids, mask) = (c.g("input_ids"), c.g("attention_mask"));
    c.close("text.embeddings", &m.text_embeddings(ids).unwrap());
    let t = m.encode_text(ids, mask).unwrap();
    c.close("T", &t);
    let ie = m.image_embeds(&v).unwrap();
    let te = m.text_embeds(&t).unwrap();
    c.close("image_embeds", &ie);
    c.close("text_embeds", &te);
    c.close("sims", &ie.matmul(&te.t().unwrap()).unwrap());
    (v, t)
}

fn check_fusion(c: &Case, v: &Tensor, t: &Tensor) {
    let m = &c.model;
    let img = c.indices("pair_image_index");
    let txt = c.indices("pair_text_index");
    let pv = v.index_select(&img, 0).unwrap();
    let pt = t.index_select(&txt, 0).unwrap();
    let pm = c.g("attention_mask").index_select(&txt, 0).unwrap();
    let mut layers = Vec::new();
    let out = m
        .fusion()
        .unwrap()
        .forward_with(&pt, &pm, &pv, |k, xs| layers.push((k, xs.clone())))
        .unwrap();
    for (k, xs) in &layers {
        c.close(&format!("fusion.layer{k}.out"), xs);
    }
    c.close("fusion.V_out", &out.v);
    c.close("fusion.T_out", &out.t);
    c.close("fusion.T_out_cls", &out.t.i((.., 0)).unwrap());
    let itm = m.itm_logits(&out.t).unwrap();
    c.close("itm_logits", &itm);
    check_shared_image(c, v, t);
    check_retrieval(c, &itm);
}

/// Reranking four texts against one image passed once (batch 1, shared keys/values) gives
/// the same ITM logits as the image repeated per text (pairs 0..4 of the goldens).
fn check_shared_image(c: &Case, v: &Tensor, t: &Tensor) {
    let m = &c.model;
    let (v0, mask) = (v.i(0..1).unwrap(), c.g("attention_mask"));
    let (v_out, t_out) = m.fuse(t, mask, &v0).unwrap();
    assert_eq!(v_out.dims(), &[4, v.dim(1).unwrap(), v.dim(2).unwrap()]);
    let itm = m.itm_logits(&t_out).unwrap();
    let want = c.g("itm_logits").i(0..4).unwrap();
    let d = (itm - want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    println!("{}: shared-image ITM max|diff| = {d:.3e}", c.label);
    assert!(d <= TOL, "{}: shared-image ITM differs by {d}", c.label);
}

/// The reference `evaluation()` with k_test = 2: ITM match logit for the top-k ITC
/// candidates of each row, -100 elsewhere.
fn check_retrieval(c: &Case, itm: &Tensor) {
    let sims = c.g("sims").to_vec2::<f32>().unwrap();
    let matched: Vec<f32> = itm.i((.., 1)).unwrap().to_vec1().unwrap();
    let (n_img, n_txt) = (sims.len(), sims[0].len());
    let pair = |i: usize, j: usize| matched[i * n_txt + j];
    let top2 = |row: Vec<f32>| {
        let mut idx: Vec<usize> = (0..row.len()).collect();
        idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        idx.truncate(2);
        idx
    };
    let mut i2t = vec![vec![-100f32; n_txt]; n_img];
    for (i, row) in i2t.iter_mut().enumerate() {
        for j in top2(sims[i].clone()) {
            row[j] = pair(i, j);
        }
    }
    let mut t2i = vec![vec![-100f32; n_img]; n_txt];
    for (j, row) in t2i.iter_mut().enumerate() {
        for i in top2((0..n_img).map(|i| sims[i][j]).collect()) {
            row[i] = pair(i, j);
        }
    }
    for (name, got) in [("retrieval.score_i2t", i2t), ("retrieval.score_t2i", t2i)] {
        let want = c.g(name).to_vec2::<f32>().unwrap();
        for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
            assert_eq!(
                *g == -100.0,
                *w == -100.0,
                "{}: {name} candidate pattern",
                c.label
            );
            assert!((g - w).abs() <= TOL, "{}: {name} {g} vs {w}", c.label);
        }
    }
}

fn check_nbest(c: &Case, prefix: &str, got: &[Vec<Hypothesis>]) {
    let best = c.ids(&format!("{prefix}.ids"));
    let lengths = c.g(&format!("{prefix}.lengths")).to_vec1::<i64>().unwrap();
    let scores = c.g(&format!("{prefix}.scores")).to_vec1::<f32>().unwrap();
    let nbest = c
        .g(&format!("{prefix}.nbest_ids"))
        .to_vec3::<i64>()
        .unwrap();
    let nscores = c
        .g(&format!("{prefix}.nbest_scores"))
        .to_vec2::<f32>()
        .unwrap();
    let counts = c
        .g(&format!("{prefix}.nbest_count"))
        .to_vec1::<i64>()
        .unwrap();
    for (i, hyps) in got.iter().enumerate() {
        let want: Vec<i64> = best[i][..lengths[i] as usize].to_vec();
        let ids: Vec<i64> = hyps[0].ids.iter().map(|&x| x as i64).collect();
        assert_eq!(ids, want, "{}: {prefix} item {i} top-1 ids", c.label);
        assert!(
            (hyps[0].score - scores[i]).abs() <= TOL,
            "{}: {prefix} item {i} score",
            c.label
        );
        assert_eq!(
            hyps.len(),
            counts[i] as usize,
            "{}: {prefix} item {i} n-best count",
            c.label
        );
        for (j, h) in hyps.iter().enumerate() {
            let want: Vec<i64> = nbest[i][j].iter().copied().filter(|&x| x >= 0).collect();
            let ids: Vec<i64> = h.ids.iter().map(|&x| x as i64).collect();
            assert_eq!(ids, want, "{}: {prefix} item {i} hypothesis {j}", c.label);
            let d = (h.score - nscores[i][j]).abs();
            assert!(
                d <= TOL,
                "{}: {prefix} item {i} hypothesis {j} score off by {d}",
                c.label
            );
        }
    }
}

fn check_caption(c: &Case, v: &Tensor) {
    let m = &c.model;
    let ones = Tensor::ones(
        (v.dim(0).unwrap(), v.dim(1).unwrap()),
        DType::I64,
        &Device::Cpu,
    )
    .unwrap();
    let logits = m
        .decoder_logits(
            c.g("caption.target_ids"),
            c.g("caption.target_mask"),
            v,
            &ones,
        )
        .unwrap();
    c.close("caption.logits", &logits);
    let hyps = m.caption(v, &m.config().generation.caption).unwrap();
    check_nbest(c, "caption", &hyps);
}

fn check_vqa(c: &Case, v: &Tensor) {
    let m = &c.model;
    let v = v.index_select(&c.indices("vqa.image_index"), 0).unwrap();
    let (q, qm) = (c.g("vqa.input_ids"), c.g("vqa.attention_mask"));
    let t = m.encode_text(q, qm).unwrap();
    c.close("vqa.T", &t);
    let (v2, t2) = m.fuse(&t, qm, &v).unwrap();
    c.close("vqa.fusion_V_out", &v2);
    c.close("vqa.fusion_T_out", &t2);
    let (memory, mask) = m.vqa_memory(&v, q, qm).unwrap();
    c.close("vqa.memory", &memory);
    assert_eq!(
        mask.to_vec2::<i64>().unwrap(),
        c.ids("vqa.memory_mask"),
        "{}: memory mask",
        c.label
    );
    let logits = m
        .decoder_logits(
            c.g("vqa.answer_ids"),
            c.g("vqa.answer_mask"),
            &memory,
            &mask,
        )
        .unwrap();
    c.close("vqa.logits", &logits);
    let hyps = m.answer(&v, q, qm, &m.config().generation.vqa).unwrap();
    check_nbest(c, "vqa", &hyps);
}

fn check_posemb(c: &Case) {
    let table = c.g("posemb.resize_in");
    c.close("posemb.resize_g6", &resize_pos_embed(table, 6).unwrap());
    c.close("posemb.resize_g3", &resize_pos_embed(table, 3).unwrap());
}

fn check_all(cfg: &str, ext: &str) {
    let c = load(cfg, ext);
    check_posemb(&c);
    let (v, t) = check_encoders(&c);
    check_fusion(&c, &v, &t);
    check_caption(&c, &v);
    check_vqa(&c, &v);
}

#[test]
fn tiny_base_safetensors_matches_reference() {
    check_all("tiny_base", "safetensors");
}

#[test]
fn tiny_base_pth_matches_reference() {
    check_all("tiny_base", "pth");
}

#[test]
fn tiny_large_safetensors_matches_reference() {
    check_all("tiny_large", "safetensors");
}

#[test]
fn tiny_large_pth_matches_reference() {
    check_all("tiny_large", "pth");
}

#[test]
fn tiny_base_modelscope_bin_matches_reference() {
    check_all("tiny_base", "modelscope.bin");
}

#[test]
fn tiny_large_module_pth_matches_reference() {
    check_all("tiny_large", "module.pth");
}
