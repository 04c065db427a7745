//! Pieces of the steps that exercise the VMM's devices from the guest (the e2e `device-reset`
//! step, the benchmark's `devbench` boots): a disk that carries the test tools into the guest,
//! and a host-side helper that serves the guest's vsock connections while the VMM runs.
//! Both are shell text for a step's `sh -c`, with the runner's placeholders left in.

/// The guest port the device steps use; the VMM connects it to `{work}/v.sock_5000`.
pub const VSOCK_PORT: u32 = 5000;

/// The VMM's vsock socket in these steps (`--vsock cid=3,uds=...`).
pub const VSOCK_UDS: &str = "{work}/v.sock";

/// Shell commands that write `{work}/tools.img`: a newc cpio archive holding the static
/// `isocell-hostile`, padded to whole 512-byte sectors (the VMM refuses a partial last sector).
/// Attached as the guest's first disk (`/dev/vda`), the scenario init unpacks it. cpio and
/// truncate are there on both test hosts (the nested host has busybox's).
pub const TOOLS_DISK: &str = "cd {work} && cp {hostile} isocell-hostile && \
     echo isocell-hostile | cpio -o -H newc > tools.img && rm isocell-hostile && \
     size=$(wc -c < tools.img) && truncate -s $(( (size + 511) / 512 * 512 )) tools.img";

/// The guest's tools disk, as an `isocell-vmm` flag value.
pub const TOOLS_DRIVE: &str = "id=tools,path={work}/tools.img,ro";

/// The socket a host-side helper listens at for guest connections to [`VSOCK_PORT`].
pub fn helper_socket() -> String {
    format!("{VSOCK_UDS}_{VSOCK_PORT}")
}

/// A script that starts `helper` (a host-side server that creates `socket`) in the background,
/// waits for the socket, runs `command`, then stops the helper by its PID (after giving it a
/// few seconds to log how its connections ended) and exits with `command`'s status. The
/// helper's log goes to stderr, each line prefixed `host: `. Only the helper's PID is waited
/// for: `command` runs in the foreground (and must not `exit`, or the helper is left running).
pub fn serve_during(helper: &str, socket: &str, command: &str) -> String {
    format!(
        "{helper} > {{work}}/helper.log 2>&1 &
helper=$!
i=0; while [ ! -S {socket} ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
{command}
status=$?
i=0; until grep -q ': done$' {{work}}/helper.log || [ $i -ge 50 ]; do sleep 0.1; i=$((i + 1)); done
kill $helper 2>/dev/null; wait $helper 2>/dev/null
sed 's/^/host: /' {{work}}/helper.log >&2
exit $status"
    )
}

/// The whole script of a device step: writes the tools disk, starts the host-side helper
/// `isocell-hostile MODE SOCKET ARGS...` and runs
/// `vmm` (the VMM and its kernel, memory and console flags) with what every device step adds:
/// the tools disk, the data disk `{work}/data.img`, vsock, `boot_args` and the report at
/// `{work}/report.json`.
pub fn device_step_script(vmm: &[&str], boot_args: &str, mode: &str, args: &[&str]) -> String {
    let vsock = format!("cid=3,uds={VSOCK_UDS}");
    let mut argv = vmm.to_vec();
    argv.extend([
        "--drive",
        TOOLS_DRIVE,
        "--drive",
        "id=data,path={work}/data.img",
        "--vsock",
        &vsock,
        "--boot-args",
        boot_args,
        "--report",
        "{work}/report.json",
    ]);
    let socket = helper_socket();
    let mut helper = vec!["{hostile}", mode, &socket];
    helper.extend(args);
    format!(
        "{TOOLS_DISK} || exit 1\n{}",
        serve_during(&command_line(&helper), &socket, &command_line(&argv))
    )
}

/// `argv` as one shell command line: words with nothing the shell treats specially stay as
/// they are (so placeholders read as written), others are single-quoted.
pub fn command_line(argv: &[&str]) -> String {
    let plain = |w: &str| {
        !w.is_empty()
            && w.bytes().all(|b| b.is_ascii_alphanumeric() || b"{}_-./,=:@%+".contains(&b))
    };
    argv.iter()
        .map(|w| if plain(w) { (*w).to_owned() } else { format!("'{}'", w.replace('\'', r"'\''")) })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn quotes_only_what_needs_it() {
        assert_eq!(
            command_line(&["{vmm}", "--boot-args", "init=/x a=b", "it's", ""]),
            r"{vmm} --boot-args 'init=/x a=b' 'it'\''s' ''"
        );
    }

    #[test]
    fn the_helper_runs_only_while_the_command_does() {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().display().to_string();
        let sock = format!("{work}/s");
        // The socket is there already; the stand-in helper logs and would live a minute.
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let helper = "sh -c 'echo helper: done; exec sleep 60'";
        let script = serve_during(helper, &sock, "sh -c 'test -S {work}/s && exit 7'")
            .replace("{work}", &work);
        let started = std::time::Instant::now();
        let out = std::process::Command::new("sh").arg("-c").arg(&script).output().unwrap();
        assert_eq!(out.status.code(), Some(7), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stderr).contains("host: helper: done"));
        assert!(started.elapsed().as_secs() < 30, "waited for the helper's own end");
    }
}
