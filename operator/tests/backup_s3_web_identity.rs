//! An IAM role for the operator's ServiceAccount (EKS web identity): with
//! `AWS_WEB_IDENTITY_TOKEN_FILE` and `AWS_ROLE_ARN` in its environment and no key pair, the
//! operator's S3 store gets its credentials from STS (`AssumeRoleWithWebIdentity`) at
//! `AWS_ENDPOINT_URL_STS`, not from the EC2 instance metadata. STS is always reached over
//! HTTPS (`object_store` refuses plain HTTP for it), so moto's plain-HTTP STS cannot answer
//! here: a TCP server on 127.0.0.1, port 0, stands for the STS endpoint and sees the TLS
//! handshake the credential request opens with.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use std::time::Duration;

use nimbus_operator::controlplane::backup::{BackupStorage, S3Options};
use object_store::ObjectStore;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

/// A TLS record of type handshake (a ClientHello) starts with this byte.
const TLS_HANDSHAKE: u8 = 0x16;

#[tokio::test]
async fn without_a_key_pair_the_store_assumes_the_service_accounts_role_through_sts() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "eyJhbGciOiJSUzI1NiJ9.e30.c2lnbmF0dXJl").unwrap();
    let sts = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sts_endpoint = format!("https://{}", sts.local_addr().unwrap());
    let env = |name: &str| match name {
        "AWS_WEB_IDENTITY_TOKEN_FILE" => Some(token.to_str().unwrap().to_owned()),
        "AWS_ROLE_ARN" => Some("arn:aws:iam::123456789012:role/nimbus-backups".to_owned()),
        "AWS_ENDPOINT_URL_STS" => Some(sts_endpoint.clone()),
        _ => None,
    };
    // The bucket's endpoint is never reached: no credentials, no request.
    let options = S3Options { endpoint: Some("http://127.0.0.1:9".into()), allow_http: true, ..S3Options::default() };
    let opened = BackupStorage::parse("s3://nimbus-backups/nimbus", options).unwrap().open_with(env).unwrap();

    let first_bytes = async {
        let (mut conn, _) = sts.accept().await.unwrap();
        let mut first = [0u8; 1];
        conn.read_exact(&mut first).await.unwrap();
        first[0]
    };
    // The listing waits on its credentials (retried against the silent STS): done when STS
    // was asked; a listing that ends first went elsewhere for its credentials.
    tokio::select! {
        first = tokio::time::timeout(Duration::from_secs(20), first_bytes) => {
            assert_eq!(first.expect("nothing reached the STS endpoint within 20 s"), TLS_HANDSHAKE);
        }
        listed = opened.store.list_with_delimiter(None) => {
            panic!("the listing ended without asking STS for credentials: {listed:?}");
        }
    }
}
