//! Container images as cell images.
//!
//! An image comes from a registry (pulled with `oci-client`), an OCI layout directory, an
//! OCI archive or a `docker save` archive. Every blob is checked against its digest before it is
//! kept ([`digest`]); the layers are flattened into one tar stream with every hostile trick
//! refused ([`flatten`]); the stream becomes a reproducible, read-only ext4 image with a
//! dm-verity hash tree ([`convert`]), cached by manifest digest in the state directory
//! ([`store`]). [`runconfig`] applies the image's Entrypoint, Cmd, Env, WorkingDir and User the
//! way `docker run` does.

pub mod convert;
pub mod digest;
pub mod flatten;
pub mod oci;
pub mod reference;
pub mod registry;
pub mod runconfig;
pub mod sources;
pub mod store;

pub use digest::Digest;
