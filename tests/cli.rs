//! The `mplug-search` command run as a process against a server on 127.0.0.1: `index` goes on
//! past bad files and always prints its summary, search filters keep their commas, boolean
//! environment values take the usual spellings, and output commands stop quietly when the
//! reader of their stdout goes away.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{serve, settings, shape_png};

/// The command with `args`, `--server` pointing at `addr`, and no `MPLUG_*` variables
/// inherited from the environment running the tests.
fn mplug_search(addr: SocketAddr, args: &[&str]) -> Command {
    let mut command = bare_command();
    command
        .args(args)
        .args(["--server", &format!("http://{addr}")])
        .env("MPLUG_SEARCH_LOG", "warn");
    command
}

/// The command without arguments or `MPLUG_*` variables from the environment.
fn bare_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mplug-search"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("MPLUG_") {
            command.env_remove(name);
        }
    }
    command
}

fn run(mut command: Command) -> (Output, String, String) {
    let output = command.output().expect("the command runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output, stdout, stderr)
}

fn write_images(dir: &Path, names: &[&str]) {
    for (seed, name) in names.iter().enumerate() {
        std::fs::write(dir.join(name), shape_png(32, [200, 30, 30], seed as u32))
            .expect("image written");
    }
}

/// The summary line `index` prints on stdout, parsed.
fn summary(stdout: &str) -> serde_json::Value {
    let line = stdout.lines().last().expect("a summary line");
    serde_json::from_str(line).expect("the summary is JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_goes_on_past_a_file_over_the_server_message_limit() {
    let data = tempfile::tempdir().expect("temp dir");
    let server = serve(settings(data.path(), None)).await;
    let photos = tempfile::tempdir().expect("temp dir");
    write_images(photos.path(), &["a.png", "c.png", "d.png"]);
    let big: Vec<u8> = (0..3u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    std::fs::write(photos.path().join("b_big.png"), big).expect("big file written");
    let dir = photos.path().to_str().expect("temp paths are UTF-8");

    let (output, stdout, stderr) = run(mplug_search(server.addr, &["index", dir]));
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let big_path = photos.path().join("b_big.png");
    let line = format!(
        "{}: too large for the message limit (1 MiB)",
        big_path.display()
    );
    assert!(stderr.contains(&line), "{stderr}");
    assert!(stderr.contains("1 files were not indexed"), "{stderr}");
    assert_eq!(
        summary(&stdout),
        serde_json::json!({"INGEST_STATUS_INDEXED": 3}),
        "{stderr}"
    );

    let (_, stdout, stderr) = run(mplug_search(server.addr, &["index", dir]));
    assert_eq!(
        summary(&stdout),
        serde_json::json!({"INGEST_STATUS_UNCHANGED": 3}),
        "{stderr}"
    );
    server.shutdown().await.expect("clean shutdown");
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_skips_file_names_that_are_not_utf8_instead_of_merging_them() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;

    let data = tempfile::tempdir().expect("temp dir");
    let server = serve(settings(data.path(), None)).await;
    let photos = tempfile::tempdir().expect("temp dir");
    write_images(photos.path(), &["b.png"]);
    for (seed, name) in [b"a\xff.png", b"a\xfe.png"].into_iter().enumerate() {
        let path = photos.path().join(OsStr::from_bytes(name));
        std::fs::write(path, shape_png(32, [30, 30, 200], seed as u32)).expect("written");
    }
    let dir = photos.path().to_str().expect("temp paths are UTF-8");

    let (output, stdout, stderr) = run(mplug_search(server.addr, &["index", dir]));
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let reported = stderr.matches(": file name is not valid UTF-8").count();
    assert_eq!(reported, 2, "{stderr}");
    assert_eq!(
        summary(&stdout),
        serde_json::json!({"INGEST_STATUS_INDEXED": 1}),
        "{stderr}"
    );
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_filter_values_keep_commas_and_rerank_reads_1_from_the_environment() {
    let data = tempfile::tempdir().expect("temp dir");
    let server = serve(settings(data.path(), None)).await;
    let photos = tempfile::tempdir().expect("temp dir");
    write_images(photos.path(), &["x,y.png", "z.png"]);
    let dir = photos.path().to_str().expect("temp paths are UTF-8");
    let (output, _, stderr) = run(mplug_search(server.addr, &["index", dir]));
    assert!(output.status.success(), "{stderr}");

    let mut search = mplug_search(server.addr, &["search", "red", "--filter", "path=x,y.png"]);
    search.env("MPLUG_SEARCH_RERANK", "1");
    let (output, stdout, stderr) = run(search);
    assert!(output.status.success(), "{stderr}");
    let hits: Vec<serde_json::Value> = stdout
        .lines()
        .map(|line| serde_json::from_str(line).expect("a hit is JSON"))
        .collect();
    assert_eq!(hits.len(), 1, "{stdout}");
    assert_eq!(hits[0]["id"], "x,y.png");
    assert!(hits[0]["itm_score"].is_number(), "not reranked: {stdout}");
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_commands_exit_quietly_when_stdout_is_closed() {
    let data = tempfile::tempdir().expect("temp dir");
    let server = serve(settings(data.path(), None)).await;
    let photos = tempfile::tempdir().expect("temp dir");
    write_images(photos.path(), &["a.png", "b.png", "c.png"]);
    let dir = photos.path().to_str().expect("temp paths are UTF-8");
    let (output, _, stderr) = run(mplug_search(server.addr, &["index", dir]));
    assert!(output.status.success(), "{stderr}");

    for args in [
        &["stats"][..],
        &["search", "red"],
        &["embed", "--text", "red"],
    ] {
        let mut command = mplug_search(server.addr, args);
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = command.spawn().expect("the command starts");
        drop(child.stdout.take());
        let output = child.wait_with_output().expect("the command ends");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{args:?}: {stderr}");
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
    }
    server.shutdown().await.expect("clean shutdown");
}

/// A server process that is killed if the test ends before it exits.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The `graph/CURRENT` files under `dir` with their contents: which graph dump is active.
fn current_dumps(dir: &Path) -> Vec<(std::path::PathBuf, String)> {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|entry| entry.file_name() == "CURRENT")
        .map(|entry| {
            let named = std::fs::read_to_string(entry.path()).expect("CURRENT readable");
            (entry.path().to_owned(), named)
        })
        .collect()
}

#[test]
fn a_server_whose_log_reader_went_away_keeps_serving_and_stops_cleanly() {
    use std::io::BufRead;

    let data = tempfile::tempdir().expect("temp dir");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let data_dir = data.path().to_str().expect("temp paths are UTF-8");
    let mut serve = bare_command();
    serve
        .args([
            "serve",
            "--listen",
            &addr.to_string(),
            "--data-dir",
            data_dir,
        ])
        .env("MPLUG_SEARCH_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = Running(serve.spawn().expect("serve starts"));
    let mut log = std::io::BufReader::new(child.0.stderr.take().expect("piped stderr"));
    let mut line = String::new();
    while !line.contains("serving") {
        line.clear();
        assert!(
            log.read_line(&mut line).expect("log readable") > 0,
            "serve ended early"
        );
    }
    // Every later log line now meets a closed pipe.
    drop(log);

    let photos = tempfile::tempdir().expect("temp dir");
    write_images(photos.path(), &["a.png"]);
    let dir = photos.path().to_str().expect("temp paths are UTF-8");
    let (output, _, stderr) = run(mplug_search(addr, &["index", dir]));
    assert!(output.status.success(), "index failed: {stderr}");
    let (output, stdout, stderr) = run(mplug_search(addr, &["stats"]));
    assert!(output.status.success(), "stats failed: {stderr}");
    assert!(stdout.contains("\"images\": 1"), "{stdout}");

    let before = current_dumps(data.path());
    let sent = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(sent.success(), "SIGTERM sent");
    let status = child.0.wait().expect("serve exits");
    assert!(status.success(), "serve exited with {status}");
    let after = current_dumps(data.path());
    assert!(
        !after.is_empty() && after != before,
        "no new graph dump: {after:?}"
    );
}
