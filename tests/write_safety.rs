//! Exports replace only regular files: a folder, FIFO, socket or device node at the destination is
//! refused with an error naming the path and what is there, and nothing is written; a symbolic link
//! is followed and its target replaced atomically, the link kept. Every special file here is made in
//! a temporary folder; the device check reads `/dev/null`'s metadata and never writes there.

#![allow(clippy::unwrap_used)]

use std::io::Write as _;
use std::path::Path;

use attend::analysis::export::{export_destination, write_atomically, write_png_rgb, ExportError};

fn entries(folder: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(folder)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn write_text(path: &Path, text: &str) -> Result<(), ExportError> {
    write_atomically(path, |writer| writer.write_all(text.as_bytes()))
}

/// Expects a refusal naming `path` and `kind`.
fn assert_refused(path: &Path, kind: &str) {
    let error = write_text(path, "new").unwrap_err();
    assert!(
        matches!(error, ExportError::NotARegularFile { .. }),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains(kind), "{message}");
    assert!(message.contains("not a regular file"), "{message}");
}

#[test]
fn a_regular_file_is_replaced_atomically() {
    let folder = tempfile::tempdir().unwrap();
    let path = folder.path().join("out.txt");
    std::fs::write(&path, "old").unwrap();
    let held_open = std::fs::File::open(&path).unwrap();
    write_text(&path, "new").unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "new");
    // A rename, not a rewrite in place: a reader holding the old file still sees the old content.
    let mut old = String::new();
    std::io::Read::read_to_string(&mut &held_open, &mut old).unwrap();
    assert_eq!(old, "old");
    assert_eq!(entries(folder.path()), vec!["out.txt"]);
    // A new file is created.
    let fresh = folder.path().join("fresh.txt");
    write_text(&fresh, "made").unwrap();
    assert_eq!(std::fs::read_to_string(&fresh).unwrap(), "made");
}

#[test]
fn a_folder_is_refused_and_kept() {
    let folder = tempfile::tempdir().unwrap();
    let occupied = folder.path().join("image.png");
    std::fs::create_dir(&occupied).unwrap();
    std::fs::write(occupied.join("keep"), "x").unwrap();
    assert_refused(&occupied, "a folder");
    let error = write_png_rgb(&occupied, 1, 1, &[0, 0, 0], None).unwrap_err();
    assert!(error.to_string().contains("a folder"), "{error}");
    assert!(occupied.is_dir());
    assert_eq!(entries(&occupied), vec!["keep"]);
    assert_eq!(
        entries(folder.path()),
        vec!["image.png"],
        "no temporary file"
    );
}

#[cfg(unix)]
#[test]
fn a_fifo_is_refused_and_kept() {
    use std::os::unix::fs::FileTypeExt as _;
    let folder = tempfile::tempdir().unwrap();
    let fifo = folder.path().join("pipe.png");
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(status.success(), "mkfifo failed");
    assert_refused(&fifo, "FIFO");
    assert!(std::fs::symlink_metadata(&fifo)
        .unwrap()
        .file_type()
        .is_fifo());
    assert_eq!(entries(folder.path()), vec!["pipe.png"]);
}

#[cfg(unix)]
#[test]
fn a_socket_is_refused_and_kept() {
    use std::os::unix::fs::FileTypeExt as _;
    let folder = tempfile::tempdir().unwrap();
    let socket = folder.path().join("socket.png");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    assert_refused(&socket, "a socket");
    assert!(std::fs::symlink_metadata(&socket)
        .unwrap()
        .file_type()
        .is_socket());
    assert_eq!(entries(folder.path()), vec!["socket.png"]);
}

#[cfg(unix)]
#[test]
fn a_device_node_is_refused_without_writing() {
    // Only the check: it reads the metadata and never opens the device.
    let device = Path::new("/dev/null");
    if !device.exists() {
        return;
    }
    let error = export_destination(device).unwrap_err();
    assert!(
        matches!(
            error,
            ExportError::NotARegularFile {
                kind: "a character device",
                ..
            }
        ),
        "{error:?}"
    );
    assert!(error.to_string().contains("/dev/null"), "{error}");
}

#[cfg(unix)]
#[test]
fn a_symlink_is_followed_and_kept() {
    let folder = tempfile::tempdir().unwrap();
    let target = folder.path().join("target.txt");
    std::fs::write(&target, "old").unwrap();
    let link = folder.path().join("link.txt");
    std::os::unix::fs::symlink("target.txt", &link).unwrap();
    write_text(&link, "new").unwrap();
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(
        std::fs::read_link(&link).unwrap(),
        Path::new("target.txt"),
        "the link still points where it did"
    );
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "new");
    assert_eq!(entries(folder.path()), vec!["link.txt", "target.txt"]);

    // A chain of links through another folder: the temporary file sits next to the final target.
    let elsewhere = folder.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let far_target = elsewhere.join("far.txt");
    std::fs::write(&far_target, "old").unwrap();
    let hop = folder.path().join("hop.txt");
    std::os::unix::fs::symlink(&far_target, &hop).unwrap();
    let chain = folder.path().join("chain.txt");
    std::os::unix::fs::symlink("hop.txt", &chain).unwrap();
    assert_eq!(export_destination(&chain).unwrap(), far_target);
    write_text(&chain, "far").unwrap();
    assert_eq!(std::fs::read_to_string(&far_target).unwrap(), "far");
    assert_eq!(entries(&elsewhere), vec!["far.txt"]);

    // A dangling link creates its target.
    let dangling = folder.path().join("dangling.txt");
    std::os::unix::fs::symlink("created.txt", &dangling).unwrap();
    write_text(&dangling, "created").unwrap();
    assert_eq!(
        std::fs::read_to_string(folder.path().join("created.txt")).unwrap(),
        "created"
    );
    assert!(std::fs::symlink_metadata(&dangling)
        .unwrap()
        .file_type()
        .is_symlink());
}

#[cfg(unix)]
#[test]
fn a_symlink_to_a_special_file_or_a_loop_is_refused() {
    let folder = tempfile::tempdir().unwrap();
    let subfolder = folder.path().join("sub");
    std::fs::create_dir(&subfolder).unwrap();
    let to_folder = folder.path().join("to_folder.png");
    std::os::unix::fs::symlink(&subfolder, &to_folder).unwrap();
    assert_refused(&to_folder, "a folder");
    assert!(entries(&subfolder).is_empty());

    let to_device = folder.path().join("to_device.png");
    std::os::unix::fs::symlink("/dev/null", &to_device).unwrap();
    let error = export_destination(&to_device).unwrap_err();
    assert!(
        error.to_string().contains("to_device.png") && error.to_string().contains("device"),
        "{error}"
    );

    let first = folder.path().join("first.png");
    let second = folder.path().join("second.png");
    std::os::unix::fs::symlink("second.png", &first).unwrap();
    std::os::unix::fs::symlink("first.png", &second).unwrap();
    let error = write_text(&first, "x").unwrap_err();
    assert!(
        error.to_string().contains("first.png") && error.to_string().contains("symbolic links"),
        "{error}"
    );
    assert_eq!(
        entries(folder.path()),
        vec![
            "first.png",
            "second.png",
            "sub",
            "to_device.png",
            "to_folder.png"
        ]
    );
}
