//! Shared helpers of the gRPC integration tests: a real server on 127.0.0.1 with the tiny
//! parity model, clients, and generated test images.

#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::io::Cursor;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageFormat};
use mplug_search::engine::{parity_model_paths, EngineConfig, ModelSource};
use mplug_search::model::Tasks;
use mplug_search::server::auth::ApiKey;
use mplug_search::server::proto::mplug_search_client::MplugSearchClient;
use mplug_search::server::{start, Limits, RunningServer, ServerSettings, DEFAULT_SHUTDOWN_GRACE};
use tonic::transport::Channel;

/// A key long enough to be accepted.
pub const API_KEY: &str = "integration-test-key-0123456789";

/// Settings for a loopback server on a free port over `data_dir`.
pub fn settings(data_dir: &Path, api_key: Option<&str>) -> ServerSettings {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let (checkpoint, config) = parity_model_paths(&root);
    ServerSettings {
        listen: "127.0.0.1:0".parse().expect("valid address"),
        metrics_listen: None,
        api_key: api_key.map(|key| ApiKey::new(key).expect("valid test key")),
        tls: None,
        data_dir: data_dir.to_owned(),
        model: ModelSource {
            checkpoint,
            config,
            tasks: Tasks::ALL,
            max_pixels: 4096 * 4096,
            precision: Default::default(),
        },
        engine: EngineConfig::default(),
        hnsw: Default::default(),
        limits: Limits {
            max_message_bytes: 1 << 20,
            ..Limits::default()
        },
        shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
    }
}

/// Starts a server and waits until the model is loaded.
pub async fn serve(settings: ServerSettings) -> RunningServer {
    let mut server = start(settings).await.expect("server starts");
    server
        .wait_ready()
        .await
        .expect("model and collection load");
    server
}

/// A plaintext channel to `addr`, for any of the server's services.
pub async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .expect("valid uri")
        .connect()
        .await
        .expect("client connects")
}

/// A plaintext client of `addr`.
pub async fn client(addr: SocketAddr) -> MplugSearchClient<Channel> {
    MplugSearchClient::new(channel(addr).await)
}

/// Encodes an image in `format`.
pub fn encode(image: DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut bytes = Cursor::new(Vec::new());
    image
        .write_to(&mut bytes, format)
        .expect("test image encodes");
    bytes.into_inner()
}

/// A `size`×`size` RGB PNG with a coloured square on a white background.
pub fn shape_png(size: u32, color: [u8; 3], seed: u32) -> Vec<u8> {
    let image = image::RgbImage::from_fn(size, size, |x, y| {
        let inside = (x + seed) % size < size / 2 && (y + seed) % size < size / 2;
        image::Rgb(if inside { color } else { [255, 255, 255] })
    });
    encode(DynamicImage::ImageRgb8(image), ImageFormat::Png)
}

/// A grayscale PNG.
pub fn gray_png() -> Vec<u8> {
    let image = image::GrayImage::from_fn(40, 30, |x, y| image::Luma([(x * 5 + y * 3) as u8]));
    encode(DynamicImage::ImageLuma8(image), ImageFormat::Png)
}

/// An RGBA PNG with transparency.
pub fn rgba_png() -> Vec<u8> {
    let image = image::RgbaImage::from_fn(32, 32, |x, y| image::Rgba([200, x as u8, y as u8, 128]));
    encode(DynamicImage::ImageRgba8(image), ImageFormat::Png)
}

/// A 16-bit RGB PNG.
pub fn rgb16_png() -> Vec<u8> {
    let image = image::ImageBuffer::<image::Rgb<u16>, Vec<u16>>::from_fn(24, 24, |x, y| {
        image::Rgb([x as u16 * 2000, y as u16 * 2000, 40000])
    });
    encode(DynamicImage::ImageRgb16(image), ImageFormat::Png)
}

/// An RGB JPEG.
pub fn rgb_jpeg() -> Vec<u8> {
    let image = image::RgbImage::from_fn(48, 48, |x, y| image::Rgb([x as u8 * 5, 90, y as u8 * 5]));
    encode(DynamicImage::ImageRgb8(image), ImageFormat::Jpeg)
}

/// A hand-built 8×8 baseline JPEG with four (CMYK) components and an Adobe marker. Each
/// Huffman table holds one 1-bit code: DC category 0 and AC end-of-block, so every block is
/// the bits `00` and the four blocks of the single MCU fill one zero byte.
pub fn cmyk_jpeg() -> Vec<u8> {
    let mut jpeg = vec![0xFF, 0xD8];
    let adobe = [b'A', b'd', b'o', b'b', b'e', 0, 100, 0, 0, 0, 0, 0];
    segment(&mut jpeg, 0xEE, &adobe);
    let mut quant = vec![0u8];
    quant.extend([1u8; 64]);
    segment(&mut jpeg, 0xDB, &quant);
    let mut frame = vec![8, 0, 8, 0, 8, 4];
    for component in 1..=4 {
        frame.extend([component, 0x11, 0]);
    }
    segment(&mut jpeg, 0xC0, &frame);
    for class in [0x00u8, 0x10] {
        let mut table = vec![class, 1];
        table.extend([0u8; 15]);
        table.push(0);
        segment(&mut jpeg, 0xC4, &table);
    }
    let mut scan = vec![4];
    for component in 1..=4 {
        scan.extend([component, 0x00]);
    }
    scan.extend([0, 63, 0]);
    segment(&mut jpeg, 0xDA, &scan);
    jpeg.extend([0x00, 0xFF, 0xD9]);
    jpeg
}

fn segment(jpeg: &mut Vec<u8>, marker: u8, body: &[u8]) {
    jpeg.extend([0xFF, marker]);
    jpeg.extend(((body.len() + 2) as u16).to_be_bytes());
    jpeg.extend(body);
}

/// A valid PNG whose header claims `width`×`height` pixels (a decompression bomb's header).
pub fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    let mut png = shape_png(8, [0, 0, 255], 0);
    // IHDR data starts after the 8-byte signature, 4-byte length and 4-byte type.
    png[16..20].copy_from_slice(&width.to_be_bytes());
    png[20..24].copy_from_slice(&height.to_be_bytes());
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
        }
    }
    !crc
}
