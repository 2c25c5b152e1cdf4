//! The demo app's images, `lessnat-demo:v1` and `lessnat-demo:v2`, built on
//! this machine from this very program: nothing is pulled and no source tree
//! is needed. The image is `FROM scratch` with the running binary
//! (`/proc/self/exe`) as `/lessnat`, plus the shared libraries and the ELF
//! interpreter it needs, at the paths it loads them from (the interpreter's
//! `--list` says which; `LD_LIBRARY_PATH` names their directories, as there
//! is no `/etc/ld.so.cache`). Its entrypoint is `lessnat demo-server -- --version
//! VERSION`; the spec's command adds `--listen`.
//!
//! The build context is a tar made in memory and sent through the engine's
//! build API (bollard). `v2` is `FROM lessnat-demo:v1` with another
//! entrypoint, so the binary is stored once. The label [`BUILD_LABEL`]
//! records a hash of everything copied in; an image with the right label is
//! used as it is.

use std::fs::File;
use std::io::{self, Read};
use std::path::PathBuf;
use std::process::Command;

use bollard::query_parameters::{BuildImageOptionsBuilder, RemoveImageOptionsBuilder};
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::runtime::Runtime;

/// Repository of the demo images.
pub const REPOSITORY: &str = "lessnat-demo";
/// Image label holding the hash of what an image was built from.
pub const BUILD_LABEL: &str = "io.lessnat.demo.build";
/// The demo's versions, oldest first.
pub const VERSIONS: [&str; 2] = ["v1", "v2"];
/// Where the running program is read from.
const EXE: &str = "/proc/self/exe";

/// Building or removing a demo image failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A file that goes into the image could not be read.
    #[error("reading {path} for the demo image")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// This program is not a 64-bit little-endian ELF file.
    #[error(
        "{EXE} is not a 64-bit little-endian ELF program; the demo image cannot be made from it"
    )]
    NotElf,
    /// The ELF interpreter could not list the shared libraries.
    #[error("listing this program's shared libraries with `{interpreter} --list`")]
    List {
        /// The interpreter.
        interpreter: String,
        /// Why.
        source: io::Error,
    },
    /// The ELF interpreter said a library is missing, or failed.
    #[error("`{interpreter} --list` of this program failed: {output}")]
    Listed {
        /// The interpreter.
        interpreter: String,
        /// What it printed.
        output: String,
    },
    /// A path is too long for the simple tar format used.
    #[error("{path} is too long a path for the demo image's build context")]
    LongPath {
        /// The path.
        path: String,
    },
    /// The Docker client could not start.
    #[error("starting the Docker client")]
    Client(#[source] io::Error),
    /// The engine could not be reached.
    #[error("connecting to the Docker engine")]
    Connect(#[source] bollard::errors::Error),
    /// The engine refused the build.
    #[error("building {tag}")]
    Build {
        /// The image.
        tag: String,
        /// Why.
        source: bollard::errors::Error,
    },
    /// The build ran and failed.
    #[error("building {tag}: {message}")]
    BuildFailed {
        /// The image.
        tag: String,
        /// The builder's message.
        message: String,
    },
    /// An image could not be removed.
    #[error("removing {tag}")]
    Remove {
        /// The image.
        tag: String,
        /// Why.
        source: bollard::errors::Error,
    },
}

/// The demo images on one engine.
pub struct Images {
    client: bollard::Docker,
    runtime: Runtime,
}

/// The reference of the demo image of `version`.
pub fn tag(version: &str) -> String {
    format!("{REPOSITORY}:{version}")
}

impl Images {
    /// Connects to the engine at `DOCKER_HOST`, or the default socket.
    pub fn connect() -> Result<Images, ImageError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ImageError::Client)?;
        let client = {
            let _context = runtime.enter();
            bollard::Docker::connect_with_defaults().map_err(ImageError::Connect)?
        };
        let client = runtime
            .block_on(client.negotiate_version())
            .map_err(ImageError::Connect)?;
        Ok(Images { client, runtime })
    }

    /// Makes sure both demo images exist and were built from this program;
    /// returns whether any had to be built.
    pub fn ensure(&self) -> Result<bool, ImageError> {
        let (context, build, library_path) = base_context()?;
        let mut built = false;
        for version in VERSIONS {
            let tag = tag(version);
            if self.label(&tag).as_deref() == Some(build.as_str()) {
                continue;
            }
            let entrypoint = format!(
                "ENTRYPOINT [\"/lessnat\", \"demo-server\", \"--\", \"--version\", \"{version}\"]\n\
                 LABEL {BUILD_LABEL}={build}\n"
            );
            let body = if version == VERSIONS[0] {
                let mut body = context.clone();
                append(
                    &mut body,
                    "Dockerfile",
                    0o644,
                    format!(
                        "FROM scratch\nCOPY rootfs/ /\nENV LD_LIBRARY_PATH={library_path}\n{entrypoint}"
                    )
                    .as_bytes(),
                )?;
                finish(body)
            } else {
                let mut body = Vec::new();
                let recipe = format!("FROM {}\n{entrypoint}", tag_of_first());
                append(&mut body, "Dockerfile", 0o644, recipe.as_bytes())?;
                finish(body)
            };
            self.build(&tag, body)?;
            built = true;
        }
        Ok(built)
    }

    /// The build label of image `tag`, if it exists.
    fn label(&self, tag: &str) -> Option<String> {
        let image = self.runtime.block_on(self.client.inspect_image(tag)).ok()?;
        image.config?.labels?.remove(BUILD_LABEL)
    }

    fn build(&self, tag: &str, context: Vec<u8>) -> Result<(), ImageError> {
        let options = BuildImageOptionsBuilder::default()
            .t(tag)
            .rm(true)
            .forcerm(true)
            .build();
        let body = bollard::body_full(context.into());
        self.runtime.block_on(async {
            let mut stream = self.client.build_image(options, None, Some(body));
            while let Some(info) = stream.next().await {
                let info = info.map_err(|source| ImageError::Build {
                    tag: tag.to_string(),
                    source,
                })?;
                if let Some(detail) = info.error_detail {
                    return Err(ImageError::BuildFailed {
                        tag: tag.to_string(),
                        message: detail.message.unwrap_or_default(),
                    });
                }
            }
            Ok(())
        })
    }

    /// Removes the demo images (newest first, as `v2` is built on `v1`);
    /// one still used by a container stays. Returns the ones removed.
    pub fn remove(&self) -> Result<Vec<String>, ImageError> {
        let mut removed = Vec::new();
        for version in VERSIONS.iter().rev() {
            let tag = tag(version);
            let options = RemoveImageOptionsBuilder::default().build();
            match self
                .runtime
                .block_on(self.client.remove_image(&tag, Some(options), None))
            {
                Ok(_) => removed.push(tag),
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404 | 409,
                    ..
                }) => {}
                Err(source) => return Err(ImageError::Remove { tag, source }),
            }
        }
        Ok(removed)
    }
}

fn tag_of_first() -> String {
    tag(VERSIONS[0])
}

/// The build context of the first image without its Dockerfile (the tar
/// entries of `rootfs/`: the program and what it loads), the hash of it, and
/// the directories of the shared libraries (`LD_LIBRARY_PATH`).
fn base_context() -> Result<(Vec<u8>, String, String), ImageError> {
    let mut context = Vec::new();
    let mut hash = Sha256::new();
    let mut files = vec![(PathBuf::from(EXE), "rootfs/lessnat".to_string())];
    let objects = shared_objects()?;
    let mut directories: Vec<String> = objects
        .iter()
        .filter_map(|path| Some(path.parent()?.display().to_string()))
        .collect();
    directories.dedup();
    let library_path = directories.join(":");
    hash.update(library_path.as_bytes());
    for library in objects {
        let inside = format!("rootfs{}", library.display());
        files.push((library, inside));
    }
    for (path, inside) in files {
        let read = |source| ImageError::Read {
            path: path.clone(),
            source,
        };
        let mut file = File::open(&path).map_err(read)?;
        let size = file.metadata().map_err(read)?.len();
        header(&mut context, &inside, 0o755, size)?;
        let start = context.len();
        (&mut file)
            .take(size)
            .read_to_end(&mut context)
            .map_err(read)?;
        hash.update(inside.as_bytes());
        hash.update(&context[start..]);
        pad(&mut context);
    }
    let digest = hash.finalize();
    let build = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    Ok((context, build, library_path))
}

/// The ELF interpreter of this program and the shared libraries it loads,
/// as absolute paths; empty for a static program.
fn shared_objects() -> Result<Vec<PathBuf>, ImageError> {
    let Some(interpreter) = interpreter()? else {
        return Ok(Vec::new());
    };
    // The interpreter's own /proc/self/exe would be itself: name the file.
    let program = std::fs::read_link(EXE).map_err(|source| ImageError::Read {
        path: PathBuf::from(EXE),
        source,
    })?;
    let listed = Command::new(&interpreter)
        .arg("--list")
        .arg(&program)
        .output()
        .map_err(|source| ImageError::List {
            interpreter: interpreter.clone(),
            source,
        })?;
    let text = String::from_utf8_lossy(&listed.stdout);
    if !listed.status.success() || text.contains("not found") {
        return Err(ImageError::Listed {
            interpreter,
            output: format!("{text}{}", String::from_utf8_lossy(&listed.stderr)),
        });
    }
    let mut objects = vec![PathBuf::from(&interpreter)];
    for line in text.lines() {
        if let Some((_, path)) = line.split_once("=> ")
            && let Some(path) = path.split(" (").next()
            && path.starts_with('/')
        {
            objects.push(PathBuf::from(path));
        }
    }
    objects.sort();
    objects.dedup();
    Ok(objects)
}

/// The `PT_INTERP` path of this program, if it has one.
fn interpreter() -> Result<Option<String>, ImageError> {
    let read = |source| ImageError::Read {
        path: PathBuf::from(EXE),
        source,
    };
    let mut file = File::open(EXE).map_err(read)?;
    let mut head = [0u8; 64];
    file.read_exact(&mut head).map_err(read)?;
    if &head[..4] != b"\x7fELF" || head[4] != 2 || head[5] != 1 {
        return Err(ImageError::NotElf);
    }
    let phoff = u64_at(&head, 32);
    let entry_size = usize::from(u16::from_le_bytes([head[54], head[55]]));
    let entries = usize::from(u16::from_le_bytes([head[56], head[57]]));
    let headers = read_at(&mut file, phoff, entry_size * entries).map_err(read)?;
    const PT_INTERP: u32 = 3;
    for entry in headers.chunks_exact(entry_size.max(56)) {
        if u32::from_le_bytes([entry[0], entry[1], entry[2], entry[3]]) == PT_INTERP {
            let bytes =
                read_at(&mut file, u64_at(entry, 8), to_usize(u64_at(entry, 32))).map_err(read)?;
            let path = bytes.split(|&b| b == 0).next().unwrap_or_default();
            return Ok(Some(String::from_utf8_lossy(path).into_owned()));
        }
    }
    Ok(None)
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

fn to_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

fn read_at(file: &mut File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    use std::io::{Seek, SeekFrom};
    file.seek(SeekFrom::Start(offset))?;
    let mut bytes = vec![0u8; len];
    file.read_exact(&mut bytes)?;
    Ok(bytes)
}

/// Appends a ustar header for a regular file.
fn header(tar: &mut Vec<u8>, path: &str, mode: u32, size: u64) -> Result<(), ImageError> {
    if path.len() >= 100 {
        return Err(ImageError::LongPath {
            path: path.to_string(),
        });
    }
    let mut block = [0u8; 512];
    block[..path.len()].copy_from_slice(path.as_bytes());
    let mut field = |at: usize, width: usize, value: u64| {
        let text = format!("{value:0w$o}\0", w = width - 1);
        block[at..at + width].copy_from_slice(text.as_bytes());
    };
    field(100, 8, u64::from(mode));
    field(108, 8, 0);
    field(116, 8, 0);
    field(124, 12, size);
    field(136, 12, 0);
    block[156] = b'0';
    block[257..263].copy_from_slice(b"ustar\0");
    block[263..265].copy_from_slice(b"00");
    block[148..156].copy_from_slice(b"        ");
    let sum: u32 = block.iter().map(|&b| u32::from(b)).sum();
    block[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    tar.extend_from_slice(&block);
    Ok(())
}

/// Pads the tar to a whole block.
fn pad(tar: &mut Vec<u8>) {
    tar.resize(tar.len().div_ceil(512) * 512, 0);
}

/// Appends a regular file with `data`.
fn append(tar: &mut Vec<u8>, path: &str, mode: u32, data: &[u8]) -> Result<(), ImageError> {
    header(tar, path, mode, data.len() as u64)?;
    tar.extend_from_slice(data);
    pad(tar);
    Ok(())
}

/// Ends the archive.
fn finish(mut tar: Vec<u8>) -> Vec<u8> {
    tar.resize(tar.len() + 1024, 0);
    tar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tar_headers_have_valid_checksums() {
        let mut tar = Vec::new();
        append(&mut tar, "Dockerfile", 0o644, b"FROM scratch\n").unwrap();
        let tar = finish(tar);
        assert_eq!(tar.len(), 512 * 4);
        let mut block = tar[..512].to_vec();
        let stored = String::from_utf8_lossy(&block[148..154]).to_string();
        block[148..156].copy_from_slice(b"        ");
        let sum: u32 = block.iter().map(|&b| u32::from(b)).sum();
        assert_eq!(u32::from_str_radix(&stored, 8).unwrap(), sum);
        assert_eq!(&tar[512..525], b"FROM scratch\n");
    }

    #[test]
    fn the_interpreter_is_among_the_shared_objects() {
        let objects = shared_objects().unwrap();
        if let Some(interpreter) = interpreter().unwrap() {
            assert!(objects.contains(&PathBuf::from(interpreter)));
        }
    }
}
