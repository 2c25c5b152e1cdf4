//! Kernel settings (`sysctl`) read and written through `/proc/sys`, from a
//! thread inside the network namespace: the `net.*` settings are per
//! namespace, and `/proc/sys/net` shows those of the namespace of the thread
//! that opens it. Routed mode needs IP forwarding and `src_valid_mark`
//! ([`ROUTED_SYSCTLS`](crate::ownership::ROUTED_SYSCTLS), and IPv6
//! forwarding where it routes IPv6); setting them in a
//! node's namespace leaves the host's own values alone.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::PathBuf;

use crate::netns::{Netns, NetnsError};

/// Reading or writing a kernel setting failed.
#[derive(Debug, thiserror::Error)]
pub enum SysctlError {
    /// The network namespace could not be entered.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// A setting could not be read.
    #[error("in {netns}, cannot read sysctl {key}")]
    Read {
        /// The setting, e.g. `net.ipv4.ip_forward`.
        key: String,
        /// Where.
        netns: String,
        /// Why (`NotFound` for a setting this kernel does not have).
        source: io::Error,
    },
    /// A setting could not be written.
    #[error("in {netns}, cannot set sysctl {key} to {value:?}")]
    Write {
        /// The setting.
        key: String,
        /// The value lessnat tried to write.
        value: String,
        /// Where.
        netns: String,
        /// Why.
        source: io::Error,
    },
}

/// Reads `keys` (such as `net.ipv4.ip_forward`) inside `netns`, with their
/// values trimmed. A key the kernel does not have is an error that names it.
pub fn read(netns: &Netns, keys: &[&str]) -> Result<BTreeMap<String, String>, SysctlError> {
    let values = netns.run(|| {
        keys.iter()
            .map(|key| {
                let value = std::fs::read_to_string(path(key)?)?;
                Ok((key.to_string(), value.trim().to_owned()))
            })
            .collect::<Vec<Result<_, io::Error>>>()
    })?;
    keys.iter()
        .zip(values)
        .map(|(key, value)| {
            value.map_err(|source| SysctlError::Read {
                key: key.to_string(),
                netns: netns.to_string(),
                source,
            })
        })
        .collect()
}

/// Reads `keys` as [`read`] does, leaving out the keys this kernel does
/// not have (`net.ipv6.*` when IPv6 is disabled): what is not there is
/// planned as a setting to make, whose write then fails with its name.
pub fn read_present(netns: &Netns, keys: &[&str]) -> Result<BTreeMap<String, String>, SysctlError> {
    let mut values = BTreeMap::new();
    for key in keys {
        match read(netns, &[key]) {
            Ok(found) => values.extend(found),
            Err(SysctlError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
    }
    Ok(values)
}

/// Sets `key` to `value` inside `netns`.
pub fn write(netns: &Netns, key: &str, value: &str) -> Result<(), SysctlError> {
    netns
        .run(|| {
            // Never create or truncate: a setting that does not exist stays an error.
            let mut file = OpenOptions::new().write(true).open(path(key)?)?;
            file.write_all(value.as_bytes())
        })?
        .map_err(|source| SysctlError::Write {
            key: key.to_owned(),
            value: value.to_owned(),
            netns: netns.to_string(),
            source,
        })
}

/// The file of `key`: `net.ipv4.ip_forward` is `/proc/sys/net/ipv4/ip_forward`.
fn path(key: &str) -> io::Result<PathBuf> {
    let parts: Vec<&str> = key.split('.').collect();
    if parts
        .iter()
        .any(|part| part.is_empty() || part.contains('/'))
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a sysctl key is dot-separated names, such as net.ipv4.ip_forward",
        ));
    }
    Ok(parts
        .iter()
        .fold(PathBuf::from("/proc/sys"), |path, part| path.join(part)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_paths_under_proc_sys() {
        assert_eq!(
            path("net.ipv4.conf.all.src_valid_mark").expect("valid"),
            PathBuf::from("/proc/sys/net/ipv4/conf/all/src_valid_mark")
        );
        for bad in [
            "",
            "net..ipv4",
            ".net",
            "net.ipv4.",
            "net/ipv4.ip_forward",
            "net.ipv4.../x",
        ] {
            assert!(path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_missing_key_is_named() {
        let error = read(&Netns::Current, &["net.ipv4.lessnat_no_such_key"]).expect_err("missing");
        assert!(
            matches!(&error, SysctlError::Read { source, .. } if source.kind() == io::ErrorKind::NotFound)
        );
        assert!(
            error.to_string().contains("net.ipv4.lessnat_no_such_key"),
            "{error}"
        );
    }

    #[test]
    fn missing_keys_are_left_out_when_asked() {
        let values = read_present(
            &Netns::Current,
            &["kernel.ostype", "net.ipv4.lessnat_no_such_key"],
        )
        .expect("readable");
        assert_eq!(values.keys().collect::<Vec<_>>(), ["kernel.ostype"]);
    }

    #[test]
    fn the_current_namespace_is_read() {
        let values = read(&Netns::Current, &["kernel.ostype"]).expect("readable");
        assert_eq!(
            values.get("kernel.ostype").map(String::as_str),
            Some("Linux")
        );
    }
}
