//! Test images and a real OCI registry for the image tests.
//!
//! [`test_images`] builds (once, cached by content) the images of `tests/images/` and returns
//! their directory. [`Registry`] runs Debian's `docker-registry` (the CNCF distribution registry)
//! on 127.0.0.1 with its storage in a fresh temporary directory, optionally behind basic auth,
//! and pushes images into it with `skopeo`. Dropping it stops the registry and removes the
//! directory.

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::host::project_root;

/// The registry binary (Debian package `docker-registry`).
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// How long a registry may take to answer `GET /v2/` after it starts.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a registry may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts with a fresh port when the one picked was taken in the meantime.
const PORT_ATTEMPTS: u32 = 5;

/// Builds the test images (`tests/images/build-test-images.sh`) unless they are cached, and
/// returns their directory: `python/` and `scratch/` (OCI layouts), `python.oci-archive.tar`,
/// `python.docker-archive.tar`. Runs the script once per test process; its progress goes to
/// stderr.
pub fn test_images() -> Result<PathBuf, String> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| {
        let script = project_root().join("tests/images/build-test-images.sh");
        let out = Command::new("bash")
            .arg(&script)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        if !out.status.success() {
            return Err(format!("{} failed ({})", script.display(), out.status));
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let dir = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
        if dir.join("python/index.json").is_file() && dir.join("scratch/index.json").is_file() {
            Ok(dir)
        } else {
            Err(format!("{} printed {stdout:?}, not an image directory", script.display()))
        }
    })
    .clone()
}

/// The digest (`sha256:...`) of the manifest tagged `tag` in the OCI layout `layout`
/// (the `org.opencontainers.image.ref.name` annotation of its `index.json`).
pub fn layout_digest(layout: &Path, tag: &str) -> Result<String, String> {
    let path = layout.join("index.json");
    let text = fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let index: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .and_then(|m| m["digest"].as_str())
        .map(str::to_owned)
        .ok_or_else(|| format!("{}: no manifest tagged {tag}", path.display()))
}

/// A `docker-registry` serving plain HTTP on 127.0.0.1, stopped (and its storage removed) when
/// dropped.
pub struct Registry {
    child: Child,
    port: u16,
    dir: PathBuf,
    creds: Option<(String, String)>,
}

impl Registry {
    /// Starts a registry that needs no credentials.
    pub fn start() -> Result<Registry, String> {
        Self::start_inner(None)
    }

    /// Starts a registry that needs HTTP basic auth as `user`/`pass` for everything
    /// (an htpasswd file with a bcrypt hash made by the system's `crypt(3)` through perl).
    pub fn start_with_auth(user: &str, pass: &str) -> Result<Registry, String> {
        if user.is_empty() || user.contains([':', '\n']) || pass.contains('\n') {
            return Err(format!("unusable credentials {user:?}"));
        }
        Self::start_inner(Some((user.to_owned(), pass.to_owned())))
    }

    fn start_inner(creds: Option<(String, String)>) -> Result<Registry, String> {
        if !Path::new(REGISTRY_BIN).is_file() {
            return Err(format!("{REGISTRY_BIN} is missing; run scripts/install-deps.sh"));
        }
        let mut last_error = String::new();
        // Each attempt has a directory of its own, which goes with its registry.
        for _ in 0..PORT_ATTEMPTS {
            let dir = fresh_dir()?;
            match Self::start_in(&dir, creds.clone()) {
                Ok(registry) => return Ok(registry),
                Err((e, retry)) => {
                    let _ = fs::remove_dir_all(&dir);
                    last_error = e;
                    if !retry {
                        break;
                    }
                }
            }
        }
        Err(format!("the registry did not start: {last_error}"))
    }

    /// One attempt in `dir`; on failure, why, and whether another port may do.
    fn start_in(dir: &Path, creds: Option<(String, String)>) -> Result<Registry, (String, bool)> {
        let fail = |e: String| (e, false);
        let auth = match &creds {
            Some((user, pass)) => {
                let htpasswd = dir.join("htpasswd");
                fs::write(&htpasswd, format!("{user}:{}\n", bcrypt(pass).map_err(fail)?))
                    .map_err(|e| fail(format!("{}: {e}", htpasswd.display())))?;
                format!(
                    "auth:\n  htpasswd:\n    realm: isocell-test\n    path: {}\n",
                    htpasswd.display()
                )
            }
            None => String::new(),
        };
        let port = free_port().map_err(fail)?;
        let config = dir.join("config.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\n\
                 log:\n  level: info\n  accesslog:\n    disabled: false\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                 http:\n  addr: 127.0.0.1:{port}\n\
                 {auth}",
                dir.join("storage").display()
            ),
        )
        .map_err(|e| fail(format!("{}: {e}", config.display())))?;
        let log_path = dir.join("registry.log");
        let log = fs::File::create(&log_path)
            .map_err(|e| fail(format!("{}: {e}", log_path.display())))?;
        let log2 = log.try_clone().map_err(|e| fail(format!("{}: {e}", log_path.display())))?;
        // Under a shell that ends the registry, and removes its directory, when its stdin
        // closes: when this process exits, even with the registry held in a static that is
        // never dropped (as the image tests do), nothing is left running or on disk. (fd 3: a
        // background job's own stdin is /dev/null.)
        let child = Command::new("sh")
            .arg("-c")
            .arg(
                r#"exec 3<&0; "$0" serve "$1" & r=$!; (cat <&3 >/dev/null; kill $r 2>/dev/null; while kill -0 $r 2>/dev/null; do sleep 0.05; done; rm -rf "$2") & wait $r"#,
            )
            .arg(REGISTRY_BIN)
            .arg(&config)
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| fail(format!("cannot start {REGISTRY_BIN}: {e}")))?;
        // From here on, dropping `registry` stops the child.
        let mut registry = Registry { child, port, dir: dir.to_owned(), creds: None };
        match registry.wait_ready(creds.as_ref()) {
            Ok(()) => {
                registry.creds = creds;
                Ok(registry)
            }
            Err(e) => {
                let text = fs::read_to_string(&log_path).unwrap_or_default();
                let retry = text.contains("address already in use");
                Err((format!("{e}; log {}:\n{text}", log_path.display()), retry))
            }
        }
    }

    /// Waits until `GET /v2/` answers 200 (with the credentials, if any).
    fn wait_ready(&mut self, creds: Option<&(String, String)>) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut last = String::from("no answer");
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("the registry exited ({status})"));
            }
            match http_get_status(self.port, "/v2/", creds) {
                Ok(200) => return Ok(()),
                Ok(code) => last = format!("GET /v2/ answered {code}"),
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!("not ready after {START_TIMEOUT:?}: {last}"))
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The registry's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The temporary directory holding the configuration, storage and logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The registry process's id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The credentials the registry requires, if any.
    pub fn creds(&self) -> Option<(&str, &str)> {
        self.creds.as_ref().map(|(u, p)| (u.as_str(), p.as_str()))
    }

    /// The registry's log so far (every attempt to start it).
    pub fn log(&self) -> String {
        let mut logs: Vec<PathBuf> = fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        logs.sort();
        logs.iter().map(|p| fs::read_to_string(p).unwrap_or_default()).collect()
    }

    /// `docker://127.0.0.1:PORT/REPO:TAG` for `repo_tag`.
    pub fn docker_ref(&self, repo_tag: &str) -> String {
        format!("docker://{}/{repo_tag}", self.addr())
    }

    /// Copies the image `src` (any skopeo transport, e.g. `oci:/path/dir:latest`) into the
    /// registry as `dest_repo_tag` (`repo:tag`); returns the reference pushed,
    /// `127.0.0.1:PORT/repo:tag`.
    pub fn push(&self, src: &str, dest_repo_tag: &str) -> Result<String, String> {
        let mut args = vec!["--insecure-policy".to_owned(), "copy".into(), "--quiet".into()];
        args.push("--dest-tls-verify=false".into());
        if let Some((user, pass)) = &self.creds {
            args.push(format!("--dest-creds={user}:{pass}"));
        }
        args.extend([src.to_owned(), self.docker_ref(dest_repo_tag)]);
        skopeo(&args)?;
        Ok(format!("{}/{dest_repo_tag}", self.addr()))
    }

    /// The digest (`sha256:...`) of the manifest the registry serves for `repo_tag`, from
    /// `skopeo inspect`.
    pub fn remote_digest(&self, repo_tag: &str) -> Result<String, String> {
        let mut args = vec!["inspect".to_owned(), "--tls-verify=false".into()];
        if let Some((user, pass)) = &self.creds {
            args.push(format!("--creds={user}:{pass}"));
        }
        args.push(self.docker_ref(repo_tag));
        let out = skopeo(&args)?;
        let json: serde_json::Value = serde_json::from_str(&out)
            .map_err(|e| format!("skopeo inspect printed no JSON ({e}): {out}"))?;
        json["Digest"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("skopeo inspect printed no Digest: {out}"))
    }

    /// Stops the registry: closes its shell's stdin (which ends both), then SIGTERM and SIGKILL,
    /// each after [`STOP_TIMEOUT`]; reaps it.
    fn stop(&mut self) {
        // Closing its stdin ends the registry and then its shell.
        drop(self.child.stdin.take());
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Ok(None) = self.child.try_wait() {
            if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
                // SAFETY: kill(2) on our own child, which has not been reaped (try_wait said it
                // is running), so the pid cannot have been reused.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
            let deadline = Instant::now() + STOP_TIMEOUT;
            while Instant::now() < deadline {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
        if !self.dir.as_os_str().is_empty() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Runs `skopeo ARGS`; its stdout, or why it failed.
pub fn skopeo(args: &[String]) -> Result<String, String> {
    let out = Command::new("skopeo")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run skopeo (run scripts/install-deps.sh): {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "skopeo {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A new, empty directory under the system's temporary directory.
fn fresh_dir() -> Result<PathBuf, String> {
    static COUNT: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    for _ in 0..100 {
        let n = COUNT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir()
            .join(format!("isocell-registry-{}-{n}-{nanos:x}", std::process::id()));
        match fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(format!("{}: {e}", dir.display())),
        }
    }
    Err("cannot create a temporary directory for the registry".into())
}

/// A port on 127.0.0.1 that was free a moment ago (bound to port 0, then released).
fn free_port() -> Result<u16, String> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(|e| format!("cannot bind 127.0.0.1:0: {e}"))?;
    listener.local_addr().map(|a| a.port()).map_err(|e| e.to_string())
}

/// The status code of `GET PATH` (HTTP/1.0) on 127.0.0.1:PORT.
fn http_get_status(port: u16, path: &str, creds: Option<&(String, String)>) -> Result<u16, String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).map_err(|e| e.to_string())?;
    let auth = creds
        .map(|(u, p)| format!("Authorization: Basic {}\r\n", base64(format!("{u}:{p}").as_bytes())))
        .unwrap_or_default();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}\r\n")
        .map_err(|e| format!("write to {addr}: {e}"))?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).map_err(|e| format!("read from {addr}: {e}"))?;
    let answer = String::from_utf8_lossy(&answer);
    let status_line = answer.lines().next().unwrap_or_default();
    status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("{addr} answered {status_line:?}"))
}

/// Standard base64 with padding.
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A bcrypt (`$2y$`) hash of `pass` for an htpasswd file, from the C library's crypt(3)
/// (libxcrypt, as in Debian 12 and later) through perl, which every Debian system has.
fn bcrypt(pass: &str) -> Result<String, String> {
    const SALT_CHARS: &[u8; 64] =
        b"./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    use std::hash::{BuildHasher, Hasher};
    let mut salt = String::from("$2y$05$");
    let mut bits = 0u64;
    for i in 0..22 {
        if i % 10 == 0 {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u32(i);
            bits = h.finish();
        }
        salt.push(char::from(SALT_CHARS[(bits & 63) as usize]));
        bits >>= 6;
    }
    let out = Command::new("perl")
        .args(["-e", "print crypt($ENV{ISOCELL_PASS}, $ENV{ISOCELL_SALT})"])
        .env("ISOCELL_PASS", pass)
        .env("ISOCELL_SALT", &salt)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run perl: {e}"))?;
    let hash = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() && hash.starts_with("$2y$05$") && hash.len() == 60 {
        Ok(hash)
    } else {
        Err(format!("crypt(3) made no bcrypt hash (got {hash:?}); the registry needs one"))
    }
}

/// Copies what a cell needs of an image store (`store`, a state directory's `images/`) into
/// `to`: its converted images and names, not its blobs. The test host then links `to` where the
/// nested host's isocell keeps images.
pub fn copy_converted(store: &Path, to: &Path) -> Result<(), String> {
    fs::create_dir_all(to).map_err(|e| format!("creating {}: {e}", to.display()))?;
    for sub in ["images", "refs"] {
        let ok = Command::new("cp")
            .arg("-a")
            .arg(store.join(sub))
            .arg(to.join(sub))
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Err(format!("copying {} failed", store.join(sub).display()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        let vectors =
            [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foobar", "Zm9vYmFy")];
        for (plain, encoded) in vectors {
            assert_eq!(base64(plain.as_bytes()), encoded, "{plain:?}");
        }
    }

    #[test]
    fn bcrypt_hashes_differ_by_salt() {
        let a = bcrypt("secret").expect("bcrypt through perl");
        let b = bcrypt("secret").expect("bcrypt through perl");
        assert_ne!(a, b, "two hashes with the same salt");
    }
}
