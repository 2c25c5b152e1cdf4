//! Images in registries: what an image reference names ([`reference`]) and
//! the credentials the Docker client config holds for its registry
//! ([`credentials`]). The engine does the pulling and the asking
//! (`backend::docker`); this module only says where and as whom.

pub mod credentials;
pub mod reference;

pub use credentials::{Credentials, CredentialsError, credentials_for};
pub use reference::{ImageRef, ReferenceError};
