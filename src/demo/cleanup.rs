//! Everything a demo run made, and its removal: the containers of the demo's
//! nodes (through lessnat itself, then directly whatever is left), lessnat's
//! table in the host namespace when the demo made it, the routed demo's
//! network namespaces, the demo images and the state directory. The run calls [`Cleanup::finish`]
//! on every path (success, failure, SIGINT or SIGTERM, which only set a
//! flag); dropping an unfinished `Cleanup` cleans up too.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use crate::backend::docker::Docker;
use crate::backend::nft;
use crate::netns::Netns;

use super::converge::{Node, Stream, converge};
use super::image::Images;
use super::topology::Site;

/// What to remove at the end of a demo run.
pub struct Cleanup {
    dir: Option<tempfile::TempDir>,
    host_nodes: Vec<Node>,
    host_table: bool,
    site: Option<Site>,
    keep: bool,
    done: bool,
}

/// A spec without nodes or services: converging a node to it removes all
/// lessnat owns there (what `lessnat destroy` does).
const NOTHING: &str = "version: 1\nnodes: []\nservices: []\n";

impl Cleanup {
    /// Starts with a fresh temporary directory for the nodes' state.
    pub fn new() -> std::io::Result<Cleanup> {
        Ok(Cleanup {
            dir: Some(tempfile::Builder::new().prefix("lessnat-demo-").tempdir()?),
            host_nodes: Vec::new(),
            host_table: false,
            site: None,
            keep: false,
            done: false,
        })
    }

    /// The directory holding the nodes' state directories.
    pub fn dir(&self) -> std::path::PathBuf {
        self.dir
            .as_ref()
            .map(|d| d.path().to_path_buf())
            .unwrap_or_default()
    }

    /// A host-mode node: lessnat destroys what it owns there; `made_table`
    /// says the demo made lessnat's table in the host namespace.
    pub fn host_node(&mut self, node: Node, made_table: bool) {
        self.host_table |= made_table;
        self.host_nodes.push(node);
    }

    /// The routed demo's site: lessnat destroys what it owns on each node,
    /// then the namespaces are deleted. Returns it, for the demo to use.
    pub fn site(&mut self, site: Site) -> &Site {
        self.site.insert(site)
    }

    /// Leaves the host-mode service, the images and the state directory in
    /// place (`--keep`).
    pub fn keep(&mut self) {
        self.keep = true;
    }

    /// Removes everything; returns what could not be removed, and why.
    pub fn finish(mut self) -> Vec<String> {
        self.clean()
    }

    fn clean(&mut self) -> Vec<String> {
        if std::mem::replace(&mut self.done, true) {
            return Vec::new();
        }
        let mut problems = Vec::new();
        let docker = Docker::connect().map_err(|e| problems.push(format!("Docker: {e}")));
        if let Ok(docker) = &docker {
            // Cleanup runs after an interrupt too: it is not interrupted.
            let not_interrupted = Arc::new(AtomicBool::new(false));
            let host_nodes = self.host_nodes.iter().filter(|_| !self.keep).cloned();
            let site_nodes = self
                .site
                .iter()
                .flat_map(|site| site.nodes().map(Node::from));
            for node in host_nodes.chain(site_nodes) {
                let destroyed = converge(&not_interrupted, &node, NOTHING, Stream::Nowhere, false);
                if let Err(e) = destroyed {
                    problems.push(format!("destroying {}: {}", node.name, chain(&e)));
                }
                remove_containers(docker, &node, &mut problems);
            }
        }
        // Namespaces go once nothing of lessnat's runs in them.
        self.site = None;
        if self.host_table && !self.keep {
            remove_host_table(&mut problems);
        }
        if !self.keep {
            match Images::connect().and_then(|images| images.remove()) {
                Ok(_) => {}
                Err(e) => problems.push(format!("demo images: {}", chain(&e))),
            }
        }
        if let Some(dir) = self.dir.take()
            && self.keep
        {
            let _ = dir.keep();
        }
        problems
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = self.clean();
    }
}

/// Removes every container lessnat has for `node`.
fn remove_containers(docker: &Docker, node: &Node, problems: &mut Vec<String>) {
    match docker.observe(&node.name) {
        Ok((containers, _)) => {
            for container in containers {
                if let Err(e) = docker.remove(&container.name) {
                    problems.push(chain(&e));
                }
            }
        }
        Err(e) => problems.push(chain(&e)),
    }
}

/// Deletes lessnat's table in the host namespace if it is still there.
fn remove_host_table(problems: &mut Vec<String>) {
    let host = Netns::default();
    let present = nft::observe(&host)
        .map(|state| !state.tables.is_empty())
        .unwrap_or(true);
    if present {
        let deleted = Command::new("nft")
            .args(["delete", "table", "inet", "lessnat"])
            .output();
        if !deleted.is_ok_and(|o| o.status.success()) {
            problems.push("could not delete the nftables table inet lessnat".to_string());
        }
    }
}

/// An error with its causes, `a: b: c`.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
