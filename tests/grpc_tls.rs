//! The server over TLS with a certificate of its own CA: clients that trust that CA work,
//! through the CLI's connection options too; plaintext clients and clients trusting another
//! CA are refused; unreadable or malformed certificate files stop the server from starting.

mod common;

use std::path::{Path, PathBuf};

use clap::Parser;
use common::{serve, settings};
use mplug_search::cli::{Cli, ClientArgs, Command};
use mplug_search::server::proto::{self, mplug_search_client::MplugSearchClient};
use mplug_search::server::TlsFiles;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

const SERVER_NAME: &str = "search.test";

/// A CA and a server certificate for [`SERVER_NAME`] it signed, written as PEM files.
struct Pki {
    ca_pem: String,
    ca_file: PathBuf,
    tls: TlsFiles,
}

fn ca(name: &str) -> (rcgen::Certificate, KeyPair) {
    let mut params = CertificateParams::new(Vec::new()).expect("ca params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().expect("ca key");
    (params.self_signed(&key).expect("ca signs itself"), key)
}

fn pki(dir: &Path) -> Pki {
    let (ca, ca_key) = ca("mplug-search test CA");
    let params = CertificateParams::new(vec![SERVER_NAME.to_string()]).expect("server params");
    let key = KeyPair::generate().expect("server key");
    let cert = params.signed_by(&key, &ca, &ca_key).expect("ca signs");
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write pem");
        path
    };
    Pki {
        ca_pem: ca.pem(),
        ca_file: write("ca.pem", ca.pem()),
        tls: TlsFiles {
            cert: write("server.pem", cert.pem()),
            key: write("server.key", key.serialize_pem()),
        },
    }
}

/// The client flags of `stats` given `flags`.
fn stats_client(flags: &[&str]) -> ClientArgs {
    let args = ["mplug-search", "stats"].iter().chain(flags);
    let cli = Cli::try_parse_from(args).expect("flags parse");
    let Command::Stats(client) = cli.command else {
        panic!("parsed as stats");
    };
    client
}

async fn tls_client(
    port: u16,
    ca_pem: &str,
) -> Result<MplugSearchClient<Channel>, tonic::transport::Error> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name(SERVER_NAME);
    let channel = Channel::from_shared(format!("https://127.0.0.1:{port}"))
        .expect("valid uri")
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(MplugSearchClient::new(channel))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_clients_that_trust_the_ca_are_served_and_others_are_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = pki(dir.path());
    let mut server_settings = settings(&dir.path().join("data"), None);
    server_settings.tls = Some(pki.tls.clone());
    let server = serve(server_settings).await;
    let port = server.addr.port();

    let mut trusted = tls_client(port, &pki.ca_pem).await.expect("tls connects");
    let stats = trusted.stats(proto::StatsRequest {}).await.expect("stats");
    assert_eq!(stats.into_inner().images, 0);

    let (other_ca, _) = ca("some other CA");
    let untrusted = match tls_client(port, &other_ca.pem()).await {
        Ok(mut client) => client.stats(proto::StatsRequest {}).await.err(),
        Err(error) => Some(tonic::Status::unavailable(error.to_string())),
    };
    assert!(
        untrusted.is_some(),
        "a certificate of an unknown CA is refused"
    );

    let plaintext = async {
        let channel = Channel::from_shared(format!("http://127.0.0.1:{port}"))
            .expect("valid uri")
            .connect()
            .await
            .map_err(|error| tonic::Status::unavailable(error.to_string()))?;
        MplugSearchClient::new(channel)
            .stats(proto::StatsRequest {})
            .await
    };
    assert!(
        plaintext.await.is_err(),
        "plaintext is refused by a TLS server"
    );

    let client = stats_client(&[
        "--server",
        &format!("https://127.0.0.1:{port}"),
        "--tls-ca",
        pki.ca_file.to_str().expect("utf-8 path"),
        "--tls-domain",
        SERVER_NAME,
    ]);
    let channel = client
        .endpoint(&format!("https://127.0.0.1:{port}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("the CLI's TLS options connect");
    MplugSearchClient::new(channel)
        .stats(proto::StatsRequest {})
        .await
        .expect("stats over the CLI's channel");
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_or_malformed_certificates_stop_the_server_from_starting() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = pki(dir.path());

    let mut missing = settings(&dir.path().join("data"), None);
    missing.tls = Some(TlsFiles {
        cert: pki.tls.cert.clone(),
        key: dir.path().join("absent.key"),
    });
    let error = mplug_search::server::start(missing)
        .await
        .err()
        .expect("a missing key file is refused");
    assert!(error.to_string().contains("absent.key"), "{error}");

    let garbage = dir.path().join("garbage.key");
    std::fs::write(&garbage, "not a key").expect("write");
    let mut malformed = settings(&dir.path().join("data"), None);
    malformed.tls = Some(TlsFiles {
        cert: pki.tls.cert.clone(),
        key: garbage,
    });
    let error = mplug_search::server::start(malformed)
        .await
        .err()
        .expect("a malformed key is refused");
    assert!(error.to_string().contains("garbage.key"), "{error}");

    let mut swapped = settings(&dir.path().join("data"), None);
    swapped.tls = Some(TlsFiles {
        cert: pki.tls.key.clone(),
        key: pki.tls.cert.clone(),
    });
    let error = mplug_search::server::start(swapped)
        .await
        .err()
        .expect("a key given as the certificate is refused");
    assert!(
        error.to_string().contains("no PEM block of CERTIFICATE"),
        "{error}"
    );

    let client = stats_client(&[
        "--server",
        "https://127.0.0.1:50051",
        "--tls-ca",
        pki.tls.key.to_str().expect("utf-8 path"),
    ]);
    let error = client
        .endpoint("https://127.0.0.1:50051")
        .expect_err("a CA file without a certificate is refused");
    assert!(error.to_string().contains("server.key"), "{error}");
}

#[test]
fn tls_options_need_an_https_server() {
    let client = stats_client(&["--server", "http://127.0.0.1:50051", "--tls-ca", "ca.pem"]);
    let error = client
        .endpoint("http://127.0.0.1:50051")
        .expect_err("plaintext with a CA is refused");
    assert!(error.to_string().contains("https"), "{error}");

    let error = client
        .endpoint("ftp://127.0.0.1:50051")
        .expect_err("unknown scheme");
    assert!(error.to_string().contains("http:// or https://"), "{error}");
}
