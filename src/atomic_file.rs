//! Replacing a file atomically and durably: write a temporary file in the same
//! directory, fsync it, rename it over the target, fsync the directory. Readers
//! see the old or the new content, never half. Used for the journal, saved
//! plans and GitOps records and metrics.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Mode for files anyone may read (records, metrics: node_exporter rarely runs as root).
pub const READABLE: u32 = 0o644;
/// Mode for files only their owner may read (saved plans carry the spec's environment).
pub const PRIVATE: u32 = 0o600;

/// Replaces `path` with `bytes` (file mode `mode`), creating its directory when missing.
pub fn write(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    // A leading dot keeps the temporary file out of globs like node_exporter's `*.prom`.
    let mut temp = tempfile::Builder::new()
        .prefix(".lessnat-")
        .tempfile_in(dir)?;
    temp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))?;
    temp.write_all(bytes)?;
    temp.as_file().sync_all()?;
    temp.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_the_file_and_leaves_nothing_else() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("sub").join("file.prom");
        super::write(&path, b"one", super::READABLE).expect("first write");
        super::write(&path, b"two", super::READABLE).expect("second write");
        assert_eq!(std::fs::read(&path).expect("read"), b"two");
        let mode = std::fs::metadata(&path)
            .expect("metadata")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644);
        let names: Vec<_> = std::fs::read_dir(dir.path().join("sub"))
            .expect("dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["file.prom"]);
    }
}
