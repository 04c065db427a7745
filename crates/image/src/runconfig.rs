//! What a cell runs for an image, by the rules `docker run` and `podman run` document:
//!
//! - **Command.** `--entrypoint` replaces the image's Entrypoint (an empty one removes it) and
//!   then also drops the image's Cmd; arguments after `--` replace Cmd. The command is
//!   Entrypoint followed by Cmd; with neither, there is nothing to run and that is an error.
//! - **Environment.** The image's Env, then `-e` values (a name given again replaces it);
//!   `PATH` defaults to the usual list, `HOME` to the user's home directory in the image's
//!   `/etc/passwd` (else `/`), and
//!   `HOSTNAME` is the cell's name.
//! - **Working directory.** `-w`, else the image's WorkingDir, else `/`; it is created if the
//!   image lacks it.
//! - **User.** `--user`, else the image's User, else root. `name`, `uid`, `name:group`,
//!   `uid:gid` and mixtures; names are looked up in the image's own `/etc/passwd` and
//!   `/etc/group`. A user found there gets its primary group and, when no group was given, the
//!   supplementary groups that list it as a member.

use crate::oci::RunConfig;

/// The default `PATH`, as Docker sets it.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What the user asked for on top of the image.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `--entrypoint` (`Some("")` removes the image's).
    pub entrypoint: Option<String>,
    /// The command after `--`.
    pub command: Vec<String>,
    /// `-e NAME=value`, in order.
    pub env: Vec<(String, String)>,
    /// `-w`.
    pub workdir: Option<String>,
    /// `--user`.
    pub user: Option<String>,
}

/// The process a cell starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Process {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Environment, in order.
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub cwd: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
    /// Capabilities and `no_new_privs` (an OCI process's); none: every capability, the
    /// cell being the boundary.
    pub privileges: Option<isocell_proto::Privileges>,
}

struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

fn passwd_entries(db: Option<&[u8]>) -> Vec<PasswdEntry> {
    let text = db.map(String::from_utf8_lossy).unwrap_or_default();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() >= 7).then_some(())?;
            Some(PasswdEntry {
                name: f[0].to_owned(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f[5].to_owned(),
            })
        })
        .collect()
}

struct GroupEntry {
    name: String,
    gid: u32,
    members: Vec<String>,
}

fn group_entries(db: Option<&[u8]>) -> Vec<GroupEntry> {
    let text = db.map(String::from_utf8_lossy).unwrap_or_default();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() >= 4).then_some(())?;
            Some(GroupEntry {
                name: f[0].to_owned(),
                gid: f[2].parse().ok()?,
                members: f[3].split(',').filter(|m| !m.is_empty()).map(str::to_owned).collect(),
            })
        })
        .collect()
}

/// The resolved user: uid, gid, supplementary groups, home.
pub fn resolve_user(
    spec: &str,
    passwd: Option<&[u8]>,
    group: Option<&[u8]>,
) -> Result<(u32, u32, Vec<u32>, String), String> {
    // `name:` is `name`, as Docker reads it.
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, "")) => (u, None),
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if user_part.is_empty() {
        return Err(format!("user {spec:?}: the user part is empty"));
    }
    let users = passwd_entries(passwd);
    let entry = match user_part.parse::<u32>() {
        Ok(uid) => users.into_iter().find(|e| e.uid == uid),
        Err(_) => Some(users.into_iter().find(|e| e.name == user_part).ok_or_else(|| {
            format!(
                "user {user_part:?} is not in the image's /etc/passwd{}; give a numeric uid \
                 (--user 1000:1000) or an existing user",
                if passwd.is_none() { " (the image has none)" } else { "" }
            )
        })?),
    };
    let uid = match (&entry, user_part.parse::<u32>()) {
        (_, Ok(uid)) => uid,
        (Some(e), Err(_)) => e.uid,
        (None, Err(_)) => return Err(format!("user {user_part:?} not found")),
    };
    let home = entry.as_ref().map_or_else(|| "/".to_owned(), |e| e.home.clone());
    let groups = group_entries(group);
    match group_part {
        Some(g) => {
            let gid = match g.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => groups.iter().find(|e| e.name == g).map(|e| e.gid).ok_or_else(|| {
                    format!("group {g:?} is not in the image's /etc/group; give a numeric gid")
                })?,
            };
            Ok((uid, gid, Vec::new(), home))
        }
        None => {
            let gid = entry.as_ref().map_or(0, |e| e.gid);
            let supplementary = match &entry {
                Some(e) => {
                    groups.iter().filter(|g| g.members.contains(&e.name)).map(|g| g.gid).collect()
                }
                None => Vec::new(),
            };
            Ok((uid, gid, supplementary, home))
        }
    }
}

/// Applies the rules to an image's config and the user's overrides.
pub fn plan(
    image: &RunConfig,
    o: &Overrides,
    passwd: Option<&[u8]>,
    group: Option<&[u8]>,
    hostname: &str,
) -> Result<Process, String> {
    let entrypoint: Vec<String> = match &o.entrypoint {
        Some(e) if e.is_empty() => Vec::new(),
        Some(e) => vec![e.clone()],
        None => image.entrypoint.clone().unwrap_or_default(),
    };
    let cmd: Vec<String> = if !o.command.is_empty() {
        o.command.clone()
    } else if o.entrypoint.is_some() {
        Vec::new()
    } else {
        image.cmd.clone().unwrap_or_default()
    };
    let argv: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
    if argv.is_empty() {
        return Err(
            "nothing to run: the image has no Entrypoint or Cmd; give a command after --".into()
        );
    }

    let user = o.user.clone().or_else(|| image.user.clone().filter(|u| !u.is_empty()));
    let (uid, gid, groups, home) = match &user {
        Some(u) => resolve_user(u, passwd, group)?,
        None => {
            let root_home = passwd_entries(passwd)
                .into_iter()
                .find(|e| e.uid == 0)
                .map_or_else(|| "/".to_owned(), |e| e.home);
            (0, 0, Vec::new(), root_home)
        }
    };

    let mut env: Vec<(String, String)> = Vec::new();
    let mut set = |k: &str, v: &str| {
        if let Some(slot) = env.iter_mut().find(|(n, _)| n == k) {
            slot.1 = v.to_owned();
        } else {
            env.push((k.to_owned(), v.to_owned()));
        }
    };
    for item in image.env.iter().flatten() {
        match item.split_once('=') {
            Some((k, v)) if !k.is_empty() => set(k, v),
            _ => {}
        }
    }
    for (k, v) in &o.env {
        set(k, v);
    }
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.insert(0, ("PATH".into(), DEFAULT_PATH.into()));
    }
    if !env.iter().any(|(k, _)| k == "HOME") {
        env.push(("HOME".into(), home));
    }
    if !env.iter().any(|(k, _)| k == "HOSTNAME") {
        env.push(("HOSTNAME".into(), hostname.into()));
    }

    let cwd = o
        .workdir
        .clone()
        .or_else(|| image.working_dir.clone().filter(|w| !w.is_empty()))
        .unwrap_or_else(|| "/".into());
    if !cwd.starts_with('/') {
        return Err(format!("the working directory {cwd:?} must be an absolute path"));
    }
    Ok(Process { argv, env, cwd, uid, gid, groups, privileges: None })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &[u8] = b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n";
    const GROUP: &[u8] = b"root:x:0:\napp:x:1000:\nstaff2:x:2000:app,other\n";

    fn image() -> RunConfig {
        RunConfig {
            entrypoint: Some(vec!["/probe".into()]),
            cmd: Some(vec!["from-cmd".into()]),
            env: Some(vec!["PATH=/usr/bin:/bin".into(), "FOO=from-image".into()]),
            working_dir: Some("/data".into()),
            user: None,
        }
    }

    fn run(o: Overrides) -> Result<Process, String> {
        plan(&image(), &o, Some(PASSWD), Some(GROUP), "cell")
    }

    #[test]
    fn command_rules_match_docker_run() {
        // No overrides: Entrypoint + Cmd.
        assert_eq!(
            run(Overrides::default()).map(|p| p.argv),
            Ok(vec!["/probe".into(), "from-cmd".into()])
        );
        // Arguments replace Cmd, keep Entrypoint.
        let o = Overrides { command: vec!["a".into(), "b".into()], ..Default::default() };
        assert_eq!(run(o).map(|p| p.argv), Ok(vec!["/probe".into(), "a".into(), "b".into()]));
        // --entrypoint replaces Entrypoint and drops the image's Cmd.
        let o = Overrides { entrypoint: Some("/bin/sh".into()), ..Default::default() };
        assert_eq!(run(o).map(|p| p.argv), Ok(vec!["/bin/sh".into()]));
        let o = Overrides {
            entrypoint: Some("/bin/sh".into()),
            command: vec!["-c".into(), "x".into()],
            ..Default::default()
        };
        assert_eq!(run(o).map(|p| p.argv), Ok(vec!["/bin/sh".into(), "-c".into(), "x".into()]));
        // An empty --entrypoint removes it; the command then stands alone.
        let o = Overrides {
            entrypoint: Some(String::new()),
            command: vec!["ls".into()],
            ..Default::default()
        };
        assert_eq!(run(o).map(|p| p.argv), Ok(vec!["ls".into()]));
        let o = Overrides { entrypoint: Some(String::new()), ..Default::default() };
        assert!(run(o).expect_err("must fail").contains("nothing to run"));
    }

    #[test]
    fn environment_and_working_directory() {
        let o = Overrides {
            env: vec![("FOO".into(), "mine".into()), ("NEW".into(), "1".into())],
            ..Default::default()
        };
        let p = run(o).expect("plan");
        assert_eq!(
            p.env,
            vec![
                ("PATH".into(), "/usr/bin:/bin".into()),
                ("FOO".into(), "mine".into()),
                ("NEW".into(), "1".into()),
                ("HOME".into(), "/root".into()),
                ("HOSTNAME".into(), "cell".into()),
            ]
        );
        assert_eq!(p.cwd, "/data");
        let p = plan(
            &RunConfig { cmd: Some(vec!["x".into()]), ..Default::default() },
            &Overrides::default(),
            None,
            None,
            "c",
        )
        .expect("plan");
        assert_eq!((p.cwd.as_str(), p.env[0].1.as_str()), ("/", DEFAULT_PATH));
        let o = Overrides { workdir: Some("relative".into()), ..Default::default() };
        assert!(run(o).is_err());
    }

    #[test]
    fn user_rules_match_docker_run() {
        let user = |u: &str| {
            run(Overrides { user: Some(u.into()), ..Default::default() })
                .map(|p| (p.uid, p.gid, p.groups))
        };
        assert_eq!(user("app"), Ok((1000, 1000, vec![2000])));
        assert_eq!(user("1000"), Ok((1000, 1000, vec![2000])));
        assert_eq!(user("app:staff2"), Ok((1000, 2000, vec![])));
        assert_eq!(user("app:0"), Ok((1000, 0, vec![])));
        assert_eq!(user("4242"), Ok((4242, 0, vec![])));
        assert_eq!(user("4242:7"), Ok((4242, 7, vec![])));
        assert!(user("nobody").expect_err("must fail").contains("not in the image's /etc/passwd"));
        assert!(user("app:nogroup").expect_err("must fail").contains("/etc/group"));
        let home = run(Overrides { user: Some("app".into()), ..Default::default() }).map(|p| p.env);
        assert!(home.is_ok_and(|e| e.contains(&("HOME".into(), "/home/app".into()))));
        // The image's own User applies when --user is not given.
        let mut img = image();
        img.user = Some("1000:2000".into());
        let p = plan(&img, &Overrides::default(), None, None, "c").expect("plan");
        assert_eq!((p.uid, p.gid), (1000, 2000));
        let p = plan(&img, &Overrides::default(), None, None, "c").expect("plan");
        assert!(p.env.contains(&("HOME".into(), "/".into())));
    }
}
