//! `bind_unix`: mode 0600, no temporary files left behind, stale sockets replaced, anything
//! else refused.

mod http_support;

use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};

use grove_api::http::bind_unix;
use http_support::TempDir;

fn entries(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read the directory")
        .map(|e| {
            e.expect("an entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn the_socket_is_0600_and_nothing_else_is_left() {
    let dir = TempDir::new("bind");
    let path = dir.path().join("api.sock");
    let listener = bind_unix(&path).expect("bind");
    let meta = std::fs::symlink_metadata(&path).expect("the socket exists");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(entries(dir.path()), ["api.sock"]);

    let client = tokio::net::UnixStream::connect(&path).await;
    assert!(client.is_ok());
    assert!(listener.accept().await.is_ok());
}

#[tokio::test]
async fn a_live_socket_is_refused_and_a_stale_one_replaced() {
    let dir = TempDir::new("bind");
    let path = dir.path().join("api.sock");
    let first = bind_unix(&path).expect("bind");
    let err = bind_unix(&path).expect_err("a socket in use");
    assert_eq!(err.kind(), ErrorKind::AddrInUse, "{err}");

    // Dropping the listener leaves the file: a stale socket, as after a crash.
    drop(first);
    assert!(path.exists());
    let second = bind_unix(&path).expect("replace the stale socket");
    let client = tokio::net::UnixStream::connect(&path).await;
    assert!(client.is_ok());
    assert!(second.accept().await.is_ok());
    assert_eq!(entries(dir.path()), ["api.sock"]);
}

#[tokio::test]
async fn other_files_are_refused() {
    let dir = TempDir::new("bind");
    let file = dir.path().join("file");
    std::fs::write(&file, b"keep me").expect("write");
    let err = bind_unix(&file).expect_err("a regular file");
    assert_eq!(err.kind(), ErrorKind::AlreadyExists, "{err}");
    assert_eq!(std::fs::read(&file).expect("still there"), b"keep me");

    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).expect("mkdir");
    assert_eq!(
        bind_unix(&sub).map(|_| ()).map_err(|e| e.kind()),
        Err(ErrorKind::AlreadyExists)
    );

    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&file, &link).expect("symlink");
    assert_eq!(
        bind_unix(&link).map(|_| ()).map_err(|e| e.kind()),
        Err(ErrorKind::AlreadyExists)
    );

    let missing = dir.path().join("no/such/dir/api.sock");
    assert!(bind_unix(&missing).is_err());
    assert_eq!(entries(dir.path()), ["file", "link", "sub"]);
}
