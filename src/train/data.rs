//! Training data in memory: images with an optional caption and question-answer pairs.
//!
//! Two sources produce the same [`Dataset`]: a user's folder of images plus a JSONL manifest
//! ([`Dataset::from_jsonl`]), and the easy-VQA package layout ([`Dataset::from_easy_vqa`]),
//! whose captions are derived from the questions asked about each image.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::{Error, Result};

/// One question about an image and its expected answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuestionAnswer {
    /// The question, as asked (no cleaning).
    pub question: String,
    /// The expected answer text.
    pub answer: String,
}

/// One image and what is known about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// Absolute or working-directory-relative path of the image file.
    pub image: PathBuf,
    /// A caption describing the image, when known.
    pub caption: Option<String>,
    /// Questions about the image with their answers (may be empty).
    pub questions: Vec<QuestionAnswer>,
}

/// A list of samples, one per distinct image, in a stable order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dataset {
    /// The samples, sorted by image path.
    pub samples: Vec<Sample>,
}

/// One line of a user's JSONL manifest: an image with a caption, a question-answer pair, or
/// both.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestLine {
    image: String,
    caption: Option<String>,
    question: Option<String>,
    answer: Option<String>,
}

impl Dataset {
    /// Reads a JSONL manifest whose `image` paths are relative to `image_root`.
    ///
    /// Every line is `{"image": "rel/path.png", "caption": "..."}` and/or
    /// `{"image": ..., "question": "...", "answer": "..."}`; several lines may name the same
    /// image, and a later caption replaces an earlier one. Blank lines are skipped.
    ///
    /// # Errors
    /// [`Error::Io`] when the manifest cannot be read, [`Error::InvalidArgument`] naming the
    /// line number when a line is not valid JSON, has a question without an answer (or the
    /// reverse), has neither a caption nor a question, or names an image outside `image_root`.
    pub fn from_jsonl(manifest: &Path, image_root: &Path) -> Result<Self> {
        let file = std::fs::File::open(manifest).map_err(|source| Error::Io {
            path: manifest.to_path_buf(),
            source,
        })?;
        let mut by_image: BTreeMap<PathBuf, Sample> = BTreeMap::new();
        for (index, line) in std::io::BufReader::new(file).lines().enumerate() {
            let line = line.map_err(|source| Error::Io {
                path: manifest.to_path_buf(),
                source,
            })?;
            if line.trim().is_empty() {
                continue;
            }
            let parsed = parse_manifest_line(&line, index + 1, image_root)?;
            merge_sample(&mut by_image, parsed);
        }
        Ok(Self {
            samples: by_image.into_values().collect(),
        })
    }

    /// Reads the easy-VQA layout under `root` for one split (`"train"` or `"test"`).
    ///
    /// Expects `root/data/<split>/questions.json` (a list of `[question, answer, image_id]`)
    /// and `root/data/<split>/images/<image_id>.png`. Each image's caption is
    /// `"a {colour} {shape}"`, derived by [`derive_captions`].
    ///
    /// # Errors
    /// [`Error::Io`] when a file cannot be read, [`Error::InvalidArgument`] when the questions
    /// file is malformed, and [`Error::ImageDecode`] when an image whose attributes the
    /// questions leave open cannot be decoded.
    pub fn from_easy_vqa(root: &Path, split: &str) -> Result<Self> {
        let split_dir = root.join("data").join(split);
        let questions_path = split_dir.join("questions.json");
        let text = std::fs::read_to_string(&questions_path).map_err(|source| Error::Io {
            path: questions_path.clone(),
            source,
        })?;
        let rows: Vec<(String, String, u64)> =
            serde_json::from_str(&text).map_err(|e| Error::InvalidArgument {
                field: questions_path.display().to_string(),
                reason: format!("expected a list of [question, answer, image_id]: {e}"),
            })?;

        let mut by_id: BTreeMap<u64, Vec<QuestionAnswer>> = BTreeMap::new();
        for (question, answer, id) in rows {
            by_id
                .entry(id)
                .or_default()
                .push(QuestionAnswer { question, answer });
        }
        let images = split_dir.join("images");
        let mut samples: Vec<Sample> = by_id
            .into_iter()
            .map(|(id, questions)| Sample {
                image: images.join(format!("{id}.png")),
                caption: None,
                questions,
            })
            .collect();
        derive_captions(&mut samples)?;
        Ok(Self { samples })
    }

    /// The distinct captions, sorted.
    pub fn captions(&self) -> Vec<String> {
        let mut captions: Vec<String> = self
            .samples
            .iter()
            .filter_map(|s| s.caption.clone())
            .collect();
        captions.sort();
        captions.dedup();
        captions
    }

    /// Every text the model reads or writes: captions, questions and answers.
    pub fn texts(&self) -> impl Iterator<Item = &str> {
        self.samples.iter().flat_map(|s| {
            let qa = s
                .questions
                .iter()
                .flat_map(|q| [q.question.as_str(), q.answer.as_str()]);
            s.caption.as_deref().into_iter().chain(qa)
        })
    }

    /// Number of question-answer pairs over all samples.
    pub fn question_count(&self) -> usize {
        self.samples.iter().map(|s| s.questions.len()).sum()
    }
}

/// Parses one manifest line into a one-entry sample.
fn parse_manifest_line(line: &str, number: usize, image_root: &Path) -> Result<Sample> {
    let invalid = |reason: String| Error::InvalidArgument {
        field: format!("manifest line {number}"),
        reason,
    };
    let parsed: ManifestLine = serde_json::from_str(line).map_err(|e| {
        invalid(format!(
            "expected an object with image, caption, question, answer: {e}"
        ))
    })?;

    let relative = Path::new(&parsed.image);
    let escapes = relative.is_absolute()
        || relative
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir));
    if escapes {
        return Err(invalid(format!(
            "image {:?} must be a relative path inside the image folder",
            parsed.image
        )));
    }

    let questions = match (parsed.question, parsed.answer) {
        (Some(question), Some(answer)) => vec![QuestionAnswer { question, answer }],
        (None, None) => Vec::new(),
        _ => return Err(invalid("question and answer must be given together".into())),
    };
    if parsed.caption.is_none() && questions.is_empty() {
        return Err(invalid(
            "expected a caption or a question-answer pair".into(),
        ));
    }
    Ok(Sample {
        image: image_root.join(relative),
        caption: parsed.caption,
        questions,
    })
}

/// Adds one parsed manifest entry to the per-image map.
fn merge_sample(by_image: &mut BTreeMap<PathBuf, Sample>, entry: Sample) {
    match by_image.get_mut(&entry.image) {
        Some(existing) => {
            if entry.caption.is_some() {
                existing.caption = entry.caption;
            }
            existing.questions.extend(entry.questions);
        }
        None => {
            by_image.insert(entry.image.clone(), entry);
        }
    }
}

/// Words that name a colour in easy-VQA questions and answers.
pub const EASY_VQA_COLOURS: [&str; 8] = [
    "red", "green", "blue", "black", "gray", "teal", "brown", "yellow",
];

/// Words that name a shape in easy-VQA questions and answers.
pub const EASY_VQA_SHAPES: [&str; 3] = ["circle", "rectangle", "triangle"];

/// What the questions about one image say about its colour and shape.
#[derive(Debug, Default, Clone)]
struct Evidence {
    present: Vec<String>,
    absent: Vec<String>,
}

impl Evidence {
    /// Reads one question-answer pair.
    ///
    /// "what …" questions assert every attribute they mention and the answer; yes/no questions
    /// assert or deny the attributes they mention, with "not"/"no" flipping the answer.
    fn add(&mut self, qa: &QuestionAnswer) {
        let words: Vec<&str> = qa
            .question
            .split(|c: char| !c.is_ascii_alphabetic())
            .filter(|w| !w.is_empty())
            .collect();
        let attributes = words
            .iter()
            .filter(|w| is_attribute(w))
            .map(|w| w.to_string());
        if words.first() == Some(&"what") {
            self.present.extend(attributes);
            if is_attribute(&qa.answer) {
                self.present.push(qa.answer.clone());
            }
            return;
        }
        let negated = words.iter().any(|w| *w == "not" || *w == "no");
        let holds = (qa.answer == "yes") != negated;
        let target = if holds {
            &mut self.present
        } else {
            &mut self.absent
        };
        target.extend(attributes);
    }

    /// The one value of `options` the evidence implies: asserted, or the only one not denied.
    fn resolve(&self, options: &[&str]) -> Option<String> {
        let asserted = options
            .iter()
            .find(|o| self.present.iter().any(|p| p == *o));
        if let Some(value) = asserted {
            return Some(value.to_string());
        }
        let open: Vec<&&str> = options
            .iter()
            .filter(|o| !self.absent.iter().any(|a| a == *o))
            .collect();
        (open.len() == 1).then(|| open[0].to_string())
    }
}

fn is_attribute(word: &str) -> bool {
    EASY_VQA_COLOURS.contains(&word) || EASY_VQA_SHAPES.contains(&word)
}

/// Sets every sample's caption to `"a {colour} {shape}"`.
///
/// The colour and shape come from the sample's questions where they settle them (about 89% of
/// easy-VQA images). For the rest, the missing attribute is read from the pixels: the shape's
/// mean colour and its fill ratio of its bounding box are compared with the class centroids of
/// the images whose questions did settle the attribute (nearest centroid). Samples with no
/// questions keep their caption.
///
/// # Errors
/// [`Error::ImageDecode`] when an image that needs the pixel fallback cannot be read.
pub fn derive_captions(samples: &mut [Sample]) -> Result<()> {
    let resolved: Vec<(Option<String>, Option<String>)> = samples
        .iter()
        .map(|s| {
            let mut evidence = Evidence::default();
            s.questions.iter().for_each(|qa| evidence.add(qa));
            (
                evidence.resolve(&EASY_VQA_COLOURS),
                evidence.resolve(&EASY_VQA_SHAPES),
            )
        })
        .collect();
    let fallback = PixelFallback::calibrate(samples, &resolved)?;

    for (sample, (colour, shape)) in samples.iter_mut().zip(resolved) {
        if sample.questions.is_empty() {
            continue;
        }
        let (colour, shape) = match (colour, shape) {
            (Some(c), Some(s)) => (c, s),
            (colour, shape) => {
                let features = ShapeFeatures::read(&sample.image)?;
                let colour = colour.unwrap_or_else(|| fallback.colour(&features));
                let shape = shape.unwrap_or_else(|| fallback.shape(&features));
                (colour, shape)
            }
        };
        sample.caption = Some(format!("a {colour} {shape}"));
    }
    Ok(())
}

/// Pixel statistics of the single shape drawn on a plain background.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ShapeFeatures {
    /// Mean RGB of the shape's pixels, 0..255.
    pub mean_rgb: [f32; 3],
    /// Shape pixels divided by the area of their bounding box.
    pub fill_ratio: f32,
}

/// Sum of absolute channel differences above which a pixel belongs to the shape.
const SHAPE_PIXEL_THRESHOLD: i32 = 60;

impl ShapeFeatures {
    /// Decodes `path` and measures the shape against the median border colour.
    ///
    /// # Errors
    /// [`Error::ImageDecode`] when the file cannot be opened or decoded.
    pub fn read(path: &Path) -> Result<Self> {
        let image = image::open(path)
            .map_err(|e| Error::ImageDecode {
                reason: format!("{}: {e}", path.display()),
            })?
            .to_rgb8();
        Ok(Self::measure(&image))
    }

    /// Measures the shape in a decoded image; an image with no shape pixels has fill 0.
    pub fn measure(image: &image::RgbImage) -> Self {
        let background = median_border(image);
        let (mut sum, mut count) = ([0f64; 3], 0u32);
        let (mut x0, mut y0, mut x1, mut y1) = (u32::MAX, u32::MAX, 0, 0);
        for (x, y, pixel) in image.enumerate_pixels() {
            let distance: i32 = (0..3)
                .map(|c| (i32::from(pixel[c]) - i32::from(background[c])).abs())
                .sum();
            if distance <= SHAPE_PIXEL_THRESHOLD {
                continue;
            }
            (0..3).for_each(|c| sum[c] += f64::from(pixel[c]));
            count += 1;
            (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
        }
        if count == 0 {
            return Self {
                mean_rgb: [f32::from(background[0]), f32::from(background[1]), 0.0],
                fill_ratio: 0.0,
            };
        }
        let area = f64::from((x1 - x0 + 1) * (y1 - y0 + 1));
        Self {
            mean_rgb: sum.map(|s| (s / f64::from(count)) as f32),
            fill_ratio: (f64::from(count) / area) as f32,
        }
    }
}

/// Per-channel median of the image's border pixels.
fn median_border(image: &image::RgbImage) -> [u8; 3] {
    let (w, h) = image.dimensions();
    let mut border: Vec<[u8; 3]> = Vec::new();
    for x in 0..w {
        border.push(image.get_pixel(x, 0).0);
        border.push(image.get_pixel(x, h - 1).0);
    }
    for y in 0..h {
        border.push(image.get_pixel(0, y).0);
        border.push(image.get_pixel(w - 1, y).0);
    }
    std::array::from_fn(|c| {
        let mut channel: Vec<u8> = border.iter().map(|p| p[c]).collect();
        channel.sort_unstable();
        channel[channel.len() / 2]
    })
}

/// Nearest-centroid classifiers for colour (mean RGB) and shape (fill ratio).
#[derive(Debug, Default)]
struct PixelFallback {
    colours: Vec<(String, [f32; 3])>,
    shapes: Vec<(String, f32)>,
}

impl PixelFallback {
    /// Learns the centroids from the samples whose questions settle the attribute; reads
    /// pixels only when some sample needs the fallback.
    fn calibrate(
        samples: &[Sample],
        resolved: &[(Option<String>, Option<String>)],
    ) -> Result<Self> {
        let needed = samples
            .iter()
            .zip(resolved)
            .any(|(s, (c, sh))| !s.questions.is_empty() && (c.is_none() || sh.is_none()));
        if !needed {
            return Ok(Self::default());
        }
        let mut colour_sums: BTreeMap<String, ([f64; 3], f64)> = BTreeMap::new();
        let mut shape_sums: BTreeMap<String, (f64, f64)> = BTreeMap::new();
        for (sample, (colour, shape)) in samples.iter().zip(resolved) {
            if colour.is_none() && shape.is_none() {
                continue;
            }
            let features = ShapeFeatures::read(&sample.image)?;
            if let Some(colour) = colour {
                let entry = colour_sums.entry(colour.clone()).or_default();
                (0..3).for_each(|c| entry.0[c] += f64::from(features.mean_rgb[c]));
                entry.1 += 1.0;
            }
            if let Some(shape) = shape {
                let entry = shape_sums.entry(shape.clone()).or_default();
                entry.0 += f64::from(features.fill_ratio);
                entry.1 += 1.0;
            }
        }
        Ok(Self {
            colours: colour_sums
                .into_iter()
                .map(|(k, (s, n))| (k, s.map(|v| (v / n) as f32)))
                .collect(),
            shapes: shape_sums
                .into_iter()
                .map(|(k, (s, n))| (k, (s / n) as f32))
                .collect(),
        })
    }

    /// The colour whose centroid is nearest; the first colour name when none was learned.
    fn colour(&self, features: &ShapeFeatures) -> String {
        let distance =
            |c: &[f32; 3]| -> f32 { (0..3).map(|i| (c[i] - features.mean_rgb[i]).powi(2)).sum() };
        self.colours
            .iter()
            .min_by(|a, b| distance(&a.1).total_cmp(&distance(&b.1)))
            .map_or_else(|| EASY_VQA_COLOURS[0].to_string(), |(name, _)| name.clone())
    }

    /// The shape whose centroid fill ratio is nearest; the first shape when none was learned.
    fn shape(&self, features: &ShapeFeatures) -> String {
        let distance = |c: f32| (c - features.fill_ratio).abs();
        self.shapes
            .iter()
            .min_by(|a, b| distance(a.1).total_cmp(&distance(b.1)))
            .map_or_else(|| EASY_VQA_SHAPES[0].to_string(), |(name, _)| name.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qa(question: &str, answer: &str) -> QuestionAnswer {
        QuestionAnswer {
            question: question.into(),
            answer: answer.into(),
        }
    }

    #[test]
    fn evidence_reads_what_and_negated_yes_no_questions() {
        let mut evidence = Evidence::default();
        evidence.add(&qa("what color is the shape?", "blue"));
        evidence.add(&qa("is there not a triangle?", "no"));
        assert_eq!(evidence.resolve(&EASY_VQA_COLOURS).as_deref(), Some("blue"));
        assert_eq!(
            evidence.resolve(&EASY_VQA_SHAPES).as_deref(),
            Some("triangle")
        );
    }

    #[test]
    fn evidence_resolves_by_elimination_only_when_one_option_is_left() {
        let mut evidence = Evidence::default();
        evidence.add(&qa("is there a circle?", "no"));
        assert_eq!(evidence.resolve(&EASY_VQA_SHAPES), None);
        evidence.add(&qa("does the image not contain a rectangle?", "yes"));
        assert_eq!(
            evidence.resolve(&EASY_VQA_SHAPES).as_deref(),
            Some("triangle")
        );
    }

    fn draw(path: &Path, colour: [u8; 3], filled: impl Fn(u32, u32) -> bool) {
        let image = image::RgbImage::from_fn(32, 32, |x, y| {
            image::Rgb(if filled(x, y) {
                colour
            } else {
                [240, 230, 240]
            })
        });
        image.save(path).expect("temp dir is writable");
    }

    #[test]
    fn pixel_fallback_settles_attributes_the_questions_leave_open() {
        let dir = tempfile::tempdir().expect("temp dir");
        let square = |x: u32, y: u32| (8..24).contains(&x) && (8..24).contains(&y);
        let wedge = |x: u32, y: u32| (8..24).contains(&x) && (8..24).contains(&y) && x <= y;
        draw(&dir.path().join("0.png"), [250, 30, 30], square);
        draw(&dir.path().join("1.png"), [30, 30, 250], wedge);
        draw(&dir.path().join("2.png"), [30, 30, 250], square);
        let sample = |id: u32, questions: Vec<QuestionAnswer>| Sample {
            image: dir.path().join(format!("{id}.png")),
            caption: None,
            questions,
        };
        let mut samples = vec![
            sample(0, vec![qa("what is the red shape?", "rectangle")]),
            sample(1, vec![qa("what is the blue shape?", "triangle")]),
            sample(2, vec![qa("is there a triangle?", "no")]),
        ];

        derive_captions(&mut samples).expect("derivation");

        let captions: Vec<_> = samples.iter().map(|s| s.caption.clone().unwrap()).collect();
        assert_eq!(
            captions,
            ["a red rectangle", "a blue triangle", "a blue rectangle"]
        );
    }

    #[test]
    fn jsonl_merges_lines_per_image_and_rejects_escaping_paths() {
        let dir = tempfile::tempdir().expect("temp dir");
        let manifest = dir.path().join("data.jsonl");
        let lines = [
            r#"{"image": "a.png", "caption": "a cat"}"#,
            "",
            r#"{"image": "a.png", "question": "what is it?", "answer": "cat"}"#,
            r#"{"image": "b.png", "question": "is it red?", "answer": "no"}"#,
        ];
        std::fs::write(&manifest, lines.join("\n")).expect("write manifest");

        let data = Dataset::from_jsonl(&manifest, dir.path()).expect("manifest parses");
        assert_eq!(data.samples.len(), 2);
        assert_eq!(data.samples[0].caption.as_deref(), Some("a cat"));
        assert_eq!(data.samples[0].questions, vec![qa("what is it?", "cat")]);
        assert_eq!(data.question_count(), 2);

        std::fs::write(&manifest, r#"{"image": "../x.png", "caption": "c"}"#).expect("write");
        let err = Dataset::from_jsonl(&manifest, dir.path()).unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
        std::fs::write(&manifest, r#"{"image": "x.png", "question": "q"}"#).expect("write");
        assert!(Dataset::from_jsonl(&manifest, dir.path()).is_err());
    }
}
