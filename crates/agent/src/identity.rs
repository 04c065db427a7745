//! The cell's own name and name-service files: `/etc/hostname`, `/etc/hosts` and
//! `/etc/resolv.conf` are the cell's, not the image's. They are written into the overlay after
//! the root is in place, replacing whatever the image has there (a link is removed, never
//! followed), and the kernel is given the host name.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Writes the cell's files under `root` (`/` in the cell) and sets the host name; with
/// `egress`, name lookups go to the agent's DNS forwarder on the loopback. Every failure is
/// collected rather than fatal: a cell without them still runs its command.
pub fn set_up(root: &Path, hostname: &str, egress: bool) -> Vec<String> {
    let mut problems = Vec::new();
    if let Err(e) = write_files(root, hostname, egress) {
        problems.push(e);
    }
    if let Err(e) = nix::unistd::sethostname(hostname) {
        problems.push(format!("sethostname {hostname}: {e}"));
    }
    problems
}

/// The files' contents for host name `name`, with or without egress.
pub fn files(name: &str, egress: bool) -> [(&'static str, String); 3] {
    let resolv = if egress {
        "# isocell: the agent forwards DNS queries to the host\nnameserver 127.0.0.1\n"
    } else {
        "# isocell: this cell has no network, so no name servers\n"
    };
    [
        ("hostname", format!("{name}\n")),
        (
            "hosts",
            format!("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{name}\n"),
        ),
        ("resolv.conf", resolv.to_owned()),
    ]
}

fn write_files(root: &Path, name: &str, egress: bool) -> Result<(), String> {
    let etc = root.join("etc");
    make_dir(&etc)?;
    for (file, text) in files(name, egress) {
        let path = etc.join(file);
        replace(&path, text.as_bytes())?;
    }
    Ok(())
}

/// Makes `dir` a real directory: a link or file there is removed first (never followed).
fn make_dir(dir: &Path) -> Result<(), String> {
    let show = dir.display();
    match fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => return Ok(()),
        Ok(_) => fs::remove_file(dir).map_err(|e| format!("replace {show}: {e}"))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{show}: {e}")),
    }
    fs::DirBuilder::new().mode(0o755).create(dir).map_err(|e| format!("create {show}: {e}"))
}

/// Writes a new file at `path` (mode 0644), removing whatever was there first: the new one is
/// created exclusively and without following links, so nothing the image put there is written
/// through.
fn replace(path: &Path, contents: &[u8]) -> Result<(), String> {
    let show = path.display();
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            fs::remove_dir_all(path).map_err(|e| format!("replace {show}: {e}"))?
        }
        Ok(_) => fs::remove_file(path).map_err(|e| format!("replace {show}: {e}"))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{show}: {e}")),
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| format!("create {show}: {e}"))?;
    f.write_all(contents).map_err(|e| format!("write {show}: {e}"))?;
    // The umask does not decide the mode.
    f.set_permissions(fs::Permissions::from_mode(0o644)).map_err(|e| format!("chmod {show}: {e}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("isocell-agent-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn links_and_odd_types_are_replaced_not_followed() {
        let root = scratch("links");
        let outside = root.join("outside");
        fs::write(&outside, "keep").unwrap();
        fs::create_dir(root.join("etc")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("etc/hosts")).unwrap();
        std::os::unix::fs::symlink("/nonexistent", root.join("etc/resolv.conf")).unwrap();
        fs::create_dir(root.join("etc/hostname")).unwrap();
        write_files(&root, "web-1", false).unwrap();
        assert_eq!(fs::read_to_string(&outside).unwrap(), "keep");
        assert_eq!(fs::read_to_string(root.join("etc/hostname")).unwrap(), "web-1\n");
        let hosts = fs::read_to_string(root.join("etc/hosts")).unwrap();
        assert!(hosts.contains("127.0.0.1\tlocalhost\n"), "{hosts}");
        assert!(hosts.ends_with("127.0.1.1\tweb-1\n"), "{hosts}");
        let resolv = fs::read_to_string(root.join("etc/resolv.conf")).unwrap();
        assert!(resolv.lines().all(|l| l.starts_with('#')), "{resolv}");
        let mode = fs::symlink_metadata(root.join("etc/hosts")).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o644);
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn with_egress_the_cell_asks_the_agents_forwarder() {
        let resolv = |egress| files("cell", egress)[2].1.clone();
        let on = resolv(true);
        let servers: Vec<_> = on.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(servers, ["nameserver 127.0.0.1"], "{on}");
        assert!(on.starts_with('#') && on.ends_with('\n'));
        let off = resolv(false);
        assert!(off.lines().all(|l| l.starts_with('#')), "{off}");
        assert_eq!(files("cell", true)[2].0, "resolv.conf");
    }

    #[test]
    fn a_missing_or_linked_etc_becomes_a_directory() {
        let root = scratch("etc");
        write_files(&root, "cell", true).unwrap();
        assert!(root.join("etc/hostname").is_file());
        let root2 = scratch("etc-link");
        fs::create_dir(root2.join("elsewhere")).unwrap();
        std::os::unix::fs::symlink(root2.join("elsewhere"), root2.join("etc")).unwrap();
        write_files(&root2, "cell", false).unwrap();
        assert!(fs::symlink_metadata(root2.join("etc")).unwrap().is_dir());
        assert_eq!(fs::read_dir(root2.join("elsewhere")).unwrap().count(), 0);
        let _ = fs::remove_dir_all(&root);
        let _ = fs::remove_dir_all(&root2);
    }
}
