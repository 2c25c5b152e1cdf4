//! A Git repository on disk for GitOps tests (`reconcile`, `agent --repo`),
//! made with the git CLI and fetched over `file://`.

use std::process::Command;

/// Whether the git CLI is there (CI installs it; elsewhere the test skips).
pub fn has_git(test: &str) -> bool {
    let ok = Command::new("git")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            !super::privileged_required(),
            "{test}: needs the git command, and LESSNAT_REQUIRE_PRIVILEGED=1"
        );
        eprintln!("SKIPPED {test}: needs the git command");
    }
    ok
}

/// A bare repository (`remote.git`, what lessnat fetches) and a work
/// repository (`work`) that commits and pushes to it, in a temporary directory.
pub struct Upstream {
    /// The temporary directory holding both.
    pub dir: tempfile::TempDir,
}

impl Upstream {
    pub fn new() -> Upstream {
        let upstream = Upstream {
            dir: tempfile::tempdir().expect("temp dir"),
        };
        upstream.git(&["init", "--quiet", "--bare", "-b", "main", "remote.git"]);
        upstream.git(&["init", "--quiet", "-b", "main", "work"]);
        upstream
    }

    pub fn git(&self, args: &[&str]) -> String {
        let output = Command::new("git")
            .current_dir(self.dir.path())
            .args([
                "-c",
                "user.name=lessnat test",
                "-c",
                "user.email=test@example.org",
            ])
            .args(args)
            .output()
            .expect("running git");
        assert!(
            output.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }

    /// Commits `text` as `spec.yaml`, pushes `main`, returns the commit id.
    pub fn commit(&self, text: &str, message: &str) -> String {
        std::fs::write(self.dir.path().join("work").join("spec.yaml"), text).expect("write spec");
        self.git(&["-C", "work", "add", "spec.yaml"]);
        self.git(&[
            "-C",
            "work",
            "commit",
            "--quiet",
            "--allow-empty",
            "-m",
            message,
        ]);
        self.git(&["-C", "work", "push", "--quiet", "../remote.git", "main"]);
        self.git(&["-C", "work", "rev-parse", "HEAD"])
    }

    /// Moves `main` back to `commit` on the remote (a reset and force-push).
    pub fn reset_to(&self, commit: &str) {
        self.git(&["-C", "work", "reset", "--quiet", "--hard", commit]);
        self.git(&[
            "-C",
            "work",
            "push",
            "--quiet",
            "--force",
            "../remote.git",
            "main",
        ]);
    }

    /// The `file://` URL of the bare repository.
    pub fn url(&self) -> String {
        format!("file://{}", self.dir.path().join("remote.git").display())
    }
}
