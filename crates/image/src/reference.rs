//! What the user names as a cell's image, told apart the way podman and skopeo users write it:
//! a registry reference (`debian:bookworm`, `registry.example:5000/team/app:1.4`,
//! `app@sha256:…`, optionally `docker://…`), `oci:DIR[:TAG]`, `oci-archive:FILE[:TAG]`,
//! `docker-archive:FILE[:REPO:TAG]`, or the path of a raw block image.

use std::path::{Path, PathBuf};

use oci_client::Reference;

/// A parsed image name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageRef {
    /// An image in a registry (Docker Hub's `docker.io` and `library/` filled in).
    Registry(Reference),
    /// An OCI image layout directory, and the tag (`org.opencontainers.image.ref.name`) or
    /// `@sha256:…` digest in its index.
    OciLayout(PathBuf, Option<String>),
    /// A tar archive of an OCI image layout.
    OciArchive(PathBuf, Option<String>),
    /// A `docker save` archive, and the `REPO:TAG` in it.
    DockerArchive(PathBuf, Option<String>),
    /// A block image used as it is (the project's base image, or one made by hand).
    Raw(PathBuf),
    /// An image already in the store, by manifest digest (`sha256:…`, as `image ls` shows).
    Stored(crate::Digest),
}

fn absolute(p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().map_or_else(|_| p.to_path_buf(), |d| d.join(p))
    }
}

/// Splits `PATH[:SUFFIX]`: the longest prefix that exists is the path. (Paths may hold ':'.)
fn split_path(rest: &str) -> (PathBuf, Option<String>) {
    if Path::new(rest).exists() {
        return (absolute(rest), None);
    }
    for (i, _) in rest.match_indices(':') {
        if Path::new(&rest[..i]).exists() {
            let suffix = &rest[i + 1..];
            return (absolute(&rest[..i]), (!suffix.is_empty()).then(|| suffix.to_owned()));
        }
    }
    (absolute(rest), None)
}

impl ImageRef {
    /// Parses a name as given on the command line or in a spec.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("the image name is empty".into());
        }
        for (prefix, make) in [
            ("oci:", ImageRef::OciLayout as fn(PathBuf, Option<String>) -> ImageRef),
            ("oci-archive:", ImageRef::OciArchive),
            ("docker-archive:", ImageRef::DockerArchive),
        ] {
            if let Some(rest) = s.strip_prefix(prefix) {
                if rest.is_empty() {
                    return Err(format!("{prefix} needs a path, as in {prefix}./app"));
                }
                let (path, suffix) = split_path(rest);
                if !path.exists() {
                    return Err(format!("{s}: {} does not exist", path.display()));
                }
                return Ok(make(path, suffix));
            }
        }
        if let Ok(d) = crate::Digest::parse(s) {
            return Ok(ImageRef::Stored(d));
        }
        if let Some(rest) = s.strip_prefix("docker://") {
            return Self::registry(rest);
        }
        // A path, when written as one, or an existing file whose name has an extension
        // (`rootfs.ext4`): a bare `alpine` is an image even if a file of that name is here.
        let looks_like_file = Path::new(s).is_file()
            && Path::new(s).file_name().is_some_and(|n| n.to_string_lossy().contains('.'))
            && !s.contains(':');
        if s.starts_with('/') || s.starts_with("./") || s.starts_with("../") || looks_like_file {
            return Ok(ImageRef::Raw(absolute(s)));
        }
        Self::registry(s)
    }

    fn registry(s: &str) -> Result<Self, String> {
        let r = parse_reference(s).map_err(|e| {
            format!(
                "{s:?} is not an image reference ({e}); write NAME[:TAG][@sha256:DIGEST], \
                 oci:DIR[:TAG], oci-archive:FILE, docker-archive:FILE or the path of a block \
                 image"
            )
        })?;
        Ok(ImageRef::Registry(r))
    }

    /// The name the store keeps: a registry reference in full (`docker.io/library/debian:12`),
    /// local sources with absolute paths.
    pub fn name(&self) -> String {
        let with = |kind: &str, p: &Path, t: &Option<String>| match t {
            Some(t) => format!("{kind}:{}:{t}", p.display()),
            None => format!("{kind}:{}", p.display()),
        };
        match self {
            ImageRef::Registry(r) => r.whole(),
            ImageRef::OciLayout(p, t) => with("oci", p, t),
            ImageRef::OciArchive(p, t) => with("oci-archive", p, t),
            ImageRef::DockerArchive(p, t) => with("docker-archive", p, t),
            ImageRef::Raw(p) => p.display().to_string(),
            ImageRef::Stored(d) => d.to_string(),
        }
    }

    /// The digest the name pins, if any (`NAME@sha256:…`, `oci:DIR:@sha256:…`).
    pub fn pinned_digest(&self) -> Option<crate::Digest> {
        match self {
            ImageRef::Registry(r) => r.digest().and_then(|d| crate::Digest::parse(d).ok()),
            ImageRef::Stored(d) => Some(d.clone()),
            ImageRef::OciLayout(_, Some(t)) | ImageRef::OciArchive(_, Some(t)) => {
                t.strip_prefix('@').and_then(|d| crate::Digest::parse(d).ok())
            }
            _ => None,
        }
    }
}

/// The registry a name without one means.
const DEFAULT_REGISTRY: &str = "docker.io";

/// A path component: lowercase letters and digits, separated by `.`, `_`, `__` or dashes.
fn component_ok(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        if !(sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-')) {
            return false;
        }
    }
    true
}

/// A registry host: letters, digits, `.` and `-` (or a bracketed IPv6 address), and a port.
fn host_ok(h: &str) -> bool {
    let (host, port) = match h.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || h.starts_with('[') => (host, Some(port)),
        _ => (h, None),
    };
    let host_good = if host.starts_with('[') && host.ends_with(']') {
        host.len() > 2
            && host[1..host.len() - 1].bytes().all(|b| b.is_ascii_hexdigit() || b == b':')
    } else {
        !host.is_empty()
            && host.split('.').all(|l| {
                !l.is_empty()
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            })
    };
    host_good
        && port
            .is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()))
}

/// Parses a registry reference by Docker's rules (`[HOST[:PORT]/]PATH[:TAG][@DIGEST]`; the first
/// component is a host when it has a `.` or `:` or is `localhost`; Docker Hub's `library/` for a
/// one-component name). Written out rather than through `oci-client`'s parser, whose regular
/// expression costs about 245 million instructions to build, every `isocell run`.
pub fn parse_reference(s: &str) -> Result<Reference, String> {
    if s.len() > 512 || s.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
        return Err("too long, or has spaces or control characters".into());
    }
    let (rest, digest) = match s.split_once('@') {
        Some((r, d)) => {
            crate::Digest::parse(d).map_err(|e| e.to_string())?;
            (r, Some(d.to_owned()))
        }
        None => (s, None),
    };
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[last_slash..].rfind(':') {
        Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
        None => (rest, None),
    };
    if let Some(t) = tag {
        let b = t.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= 128
            && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
            && b.iter().all(|&x| x.is_ascii_alphanumeric() || b"_.-".contains(&x));
        if !ok {
            return Err(format!("tag {t:?}: letters, digits, '_', '.' and '-', at most 128"));
        }
    }
    let (registry, path) = match name.split_once('/') {
        Some((first, path))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            if !host_ok(first) {
                return Err(format!("registry {first:?} is not a host name with an optional port"));
            }
            // Docker Hub by any of its names is docker.io, with `library/` for official images.
            if matches!(first, "docker.io" | "index.docker.io" | "registry-1.docker.io") {
                let path =
                    if path.contains('/') { path.to_owned() } else { format!("library/{path}") };
                (DEFAULT_REGISTRY.to_owned(), path)
            } else {
                (first.to_owned(), path.to_owned())
            }
        }
        Some(_) => (DEFAULT_REGISTRY.to_owned(), name.to_owned()),
        None => (DEFAULT_REGISTRY.to_owned(), format!("library/{name}")),
    };
    if path.is_empty() || path.len() > 255 {
        return Err("the repository name is empty or longer than 255".into());
    }
    if let Some(bad) = path.split('/').find(|c| !component_ok(c)) {
        return Err(format!(
            "repository component {bad:?}: lowercase letters and digits, separated by '.', '_' or '-'"
        ));
    }
    Ok(match (tag, digest) {
        (Some(t), Some(d)) => Reference::with_tag_and_digest(registry, path, t.to_owned(), d),
        (None, Some(d)) => Reference::with_digest(registry, path, d),
        (t, None) => Reference::with_tag(registry, path, t.unwrap_or("latest").to_owned()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_names_as_docker_and_podman_users_write_them() {
        let name = |s: &str| ImageRef::parse(s).map(|r| r.name());
        assert_eq!(name("busybox"), Ok("docker.io/library/busybox:latest".into()));
        assert_eq!(name("debian:bookworm"), Ok("docker.io/library/debian:bookworm".into()));
        assert_eq!(name("team/app:1.4"), Ok("docker.io/team/app:1.4".into()));
        assert_eq!(
            name("registry.example:5000/team/app:1.4"),
            Ok("registry.example:5000/team/app:1.4".into())
        );
        assert_eq!(name("docker://127.0.0.1:5000/x"), Ok("127.0.0.1:5000/x:latest".into()));
        let d = crate::Digest::of(b"m");
        let pinned = ImageRef::parse(&format!("app@{d}")).expect("pinned");
        assert_eq!(pinned.pinned_digest(), Some(d.clone()));
        assert!(ImageRef::parse("team/App").is_err());
        assert_eq!(name("localhost/app"), Ok("localhost/app:latest".into()));
        assert_eq!(name("docker.io/debian"), Ok("docker.io/library/debian:latest".into()));
        assert_eq!(name("index.docker.io/team/app:2"), Ok("docker.io/team/app:2".into()));
        assert_eq!(name("localhost:5000/a/b/c:v1.2_x"), Ok("localhost:5000/a/b/c:v1.2_x".into()));
        assert_eq!(name("my_org/app-name__x:1"), Ok("docker.io/my_org/app-name__x:1".into()));
        assert_eq!(name("[::1]:5000/app"), Ok("[::1]:5000/app:latest".into()));
        let both = ImageRef::parse(&format!("r.io/app:1@{d}")).map(|r| r.name());
        assert_eq!(both, Ok(format!("r.io/app:1@{d}")));
        for bad in [
            "app:",
            "app:-x",
            "-app",
            "app_",
            "a..b",
            "r.io/",
            "r.io:x/app",
            "a//b",
            "app@sha256:12",
        ] {
            assert!(ImageRef::parse(bad).is_err(), "{bad} accepted");
        }
        assert!(ImageRef::parse("a b").is_err());
        assert!(ImageRef::parse("app@sha256:zz").is_err());
        assert!(ImageRef::parse("").is_err());
        assert_eq!(ImageRef::parse(d.as_str()), Ok(ImageRef::Stored(d.clone())));
        assert!(ImageRef::parse("oci:/does/not/exist").is_err());
    }

    #[test]
    fn local_sources_split_path_and_tag() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("lay:out");
        std::fs::create_dir(&dir).expect("mkdir");
        let s = format!("oci:{}:v1", dir.display());
        assert_eq!(ImageRef::parse(&s), Ok(ImageRef::OciLayout(dir.clone(), Some("v1".into()))));
        let s = format!("oci:{}", dir.display());
        assert_eq!(ImageRef::parse(&s), Ok(ImageRef::OciLayout(dir.clone(), None)));
        let file = tmp.path().join("a.tar");
        std::fs::write(&file, b"").expect("write");
        let s = format!("docker-archive:{}:team/app:1", file.display());
        assert_eq!(
            ImageRef::parse(&s),
            Ok(ImageRef::DockerArchive(file.clone(), Some("team/app:1".into())))
        );
        assert_eq!(ImageRef::parse(&file.display().to_string()), Ok(ImageRef::Raw(file)));
    }
}
