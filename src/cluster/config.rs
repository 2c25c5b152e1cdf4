//! The spec's `cluster.etcd` as settings for the etcd backend.

use std::path::PathBuf;
use std::time::Duration;

use crate::backend::etcd::{CONNECT_TIMEOUT, EtcdConfig, REQUEST_TIMEOUT, TlsFiles};
use crate::spec::Etcd;

use super::keys::Keys;

/// How the backend reaches the etcd of `etcd`, with the default timeouts.
pub fn etcd_config(etcd: &Etcd) -> EtcdConfig {
    EtcdConfig {
        endpoints: etcd.endpoints.iter().map(|e| e.value.clone()).collect(),
        tls: etcd.tls.as_ref().map(|tls| TlsFiles {
            ca: PathBuf::from(&tls.ca.value),
            identity: tls
                .cert
                .as_ref()
                .zip(tls.key.as_ref())
                .map(|(cert, key)| (PathBuf::from(&cert.value), PathBuf::from(&key.value))),
        }),
        connect_timeout: CONNECT_TIMEOUT,
        request_timeout: REQUEST_TIMEOUT,
    }
}

/// The keys of the site `etcd` describes.
pub fn keys(etcd: &Etcd) -> Keys {
    Keys::new(&etcd.prefix.value)
}

/// The lease TTL `etcd` asks for.
pub fn lease_ttl(etcd: &Etcd) -> Duration {
    etcd.lease_ttl.value.get()
}
