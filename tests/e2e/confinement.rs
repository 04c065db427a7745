//! End-to-end tests of confinement: the jail, the VMM's seccomp filters, cleanup after killed
//! cells, memory isolation, and the attack surface against what the guest itself sees. All
//! steps run in one scenario, so the test host boots once for this file.

use std::collections::{BTreeSet, HashMap};
use std::sync::OnceLock;

use isocell_e2e::{result_of, run_scenario, shell_step, Results};
use isocell_testhost::{Scenario, StepResult};

/// `isocell` with this scenario's run and state directories.
const ISOCELL: &str = "ISOCELL_RUN_DIR={work}/run ISOCELL_STATE_DIR={work}/state {isocell}";

/// Shell functions the steps share: `vmm_pid` waits for a running jailed VMM (the process in a
/// cell cgroup whose executable is the jail's /isocell-vmm) and prints its pid.
const HELPERS: &str = r#"
vmm_pid() {
  local n f p
  for n in $(seq 1 600); do
    for f in /sys/fs/cgroup/isocell/*/cgroup.procs; do
      for p in $(cat $f 2>/dev/null); do
        [ "$(readlink /proc/$p/exe 2>/dev/null)" = /isocell-vmm ] && { echo $p; return 0; }
      done
    done
    sleep 0.1
  done
  return 1
}
leftovers() {
  echo "cgroups=$(find /sys/fs/cgroup/isocell -mindepth 1 -type d 2>/dev/null | wc -l)"
  echo "run_dirs=$(ls {work}/run 2>/dev/null | wc -l)"
  echo "mounts=$(grep -c {work}/run /proc/mounts)"
  # Live ones: a zombie (Z) is only a pid the test host's PID 1 has not reaped.
  echo "processes=$(cat /proc/[0-9]*/stat 2>/dev/null | grep -c -E '\((isocell-vmm|isocell-jailer)\) [^Z]')"
}
"#;

fn script(body: &str) -> String {
    format!("{HELPERS}\n{body}")
}

fn scenario() -> Scenario {
    let run = format!("{ISOCELL} run --memory 128M");
    Scenario {
        steps: vec![
            shell_step(
                "seccomp-probe",
                &script(&format!(
                    "for k in main vcpu virtio-blk virtio-rng virtio-vsock; do \
                       ISOCELL_TEST_SECCOMP_PROBE=$k {run} -- true 2>{{work}}/$k.err; \
                       echo \"$k rc=$?\"; grep -o 'killed by SIGSYS[^;]*' {{work}}/$k.err | head -n 1; \
                     done; leftovers"
                )),
                400,
            ),
            shell_step(
                "jail-view",
                &script(&format!(
                    "{run} -- sleep 6 & \
                     p=$(vmm_pid) || {{ echo no VMM; exit 3; }}; \
                     for i in $(seq 1 600); do \
                       [ $(ls /proc/$p/task | wc -l) -ge 3 ] && ! grep -q 'Seccomp:.0' /proc/$p/task/*/status && break; sleep 0.1; done; \
                     echo \"== files\"; find /proc/$p/root/ -path /proc/$p/root/proc/'*' -prune -o -print \
                       | sed \"s|^/proc/$p/root||\" | sort; \
                     echo \"== shadow\"; ls /proc/$p/root/etc/shadow /proc/$p/root/root 2>&1 | head -n 2; \
                     echo \"== status\"; grep -E '^(Uid|Gid|Groups|NoNewPrivs|CapEff|CapBnd|Seccomp):' /proc/$p/status; \
                     echo \"== threads\"; for t in /proc/$p/task/*; do echo \"$(cat $t/comm) $(grep ^Seccomp: $t/status)\"; done; \
                     echo \"== ns\"; for n in mnt pid ipc uts net cgroup; do \
                       [ \"$(readlink /proc/$p/ns/$n)\" != \"$(readlink /proc/self/ns/$n)\" ] && echo private-$n; done; \
                     echo \"== limits\"; grep -E 'open files|file size|core file' /proc/$p/limits; \
                     echo \"== fds\"; ls /proc/$p/fd | wc -l; \
                     echo \"== cgroup\"; cg=/sys/fs/cgroup$(cut -d: -f3 /proc/$p/cgroup); echo $cg; \
                       cat $cg/memory.max $cg/pids.max $cg/cpu.max; \
                     wait; echo \"run rc=$?\"; \
                     echo \"== surface\"; {ISOCELL} surface --memory 128M > {{work}}/surface.json && echo surface-ok; \
                     {ISOCELL} surface --memory 128M --diff {{work}}/surface.json; echo \"same rc=$?\"; \
                     {ISOCELL} surface --memory 128M --no-jail --diff {{work}}/surface.json > {{work}}/nojail.txt; echo \"nojail rc=$?\"; \
                     {ISOCELL} surface --memory 128M --no-jail --diff {{work}}/surface.json | head -n 1; \
                     cat {{work}}/surface.json"
                )),
                300,
            ),
            shell_step(
                "memory-hog",
                &script(&format!(
                    "{run} -- sh -c 'x=a; while true; do x=$x$x; done' >/dev/null 2>{{work}}/hog.err & hog=$!; \
                     {run} -- sh -c 'sleep 2; echo b-ok' > {{work}}/b.out; echo \"b rc=$?\"; \
                     wait $hog; echo \"hog rc=$?\"; cat {{work}}/b.out; \
                     echo \"host=$(cat /proc/loadavg >/dev/null && echo alive)\"; \
                     {run} -- echo after-ok; leftovers"
                )),
                400,
            ),
            shell_step(
                "twenty-cells",
                &script(&format!(
                    "for i in $(seq 1 20); do \
                       if [ $((i % 5)) = 0 ]; then \
                         {run} -- sleep 100 2>/dev/null & r=$!; p=$(vmm_pid); kill -9 $p; wait $r; echo \"cell $i vmm-killed rc=$?\"; \
                       elif [ $((i % 7)) = 0 ]; then \
                         {run} -- sleep 100 2>/dev/null & r=$!; vmm_pid >/dev/null; kill -9 $r; wait $r; echo \"cell $i isocell-killed rc=$?\"; \
                         sleep 1; \
                       else \
                         {run} -- true; echo \"cell $i rc=$?\"; \
                       fi; \
                     done; \
                     {run} -- true; echo \"final rc=$?\"; leftovers"
                )),
                900,
            ),
            shell_step(
                "manifest",
                &script(&format!(
                    "{run} -- sh -c 'for d in /sys/bus/virtio/devices/*; do \
                        echo \"virtio $(cat $d/device) $(basename $(dirname $(readlink -f $d))) $(cat $d/features)\"; done; \
                        grep virtio-mmio\\. /proc/iomem | sed \"s/^ *//\"; grep serial /proc/ioports | sed \"s/^ *//\"'; \
                     echo \"== record\"; {ISOCELL} surface --cell $(ls {{work}}/state/cells -t | head -n 1)"
                )),
                200,
            ),
        ],
        ..Default::default()
    }
}

fn results() -> &'static Results {
    static RESULTS: OnceLock<Results> = OnceLock::new();
    RESULTS.get_or_init(|| run_scenario("confinement", &scenario()))
}

fn ok(name: &str) -> &'static StepResult {
    let r = result_of(results(), name);
    assert_eq!(r.exit_code, Some(0), "{}", r.explain());
    r
}

/// The lines of `text` between `== name` and the next `== ` header.
fn section<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    text.lines()
        .skip_while(|l| *l != format!("== {name}"))
        .skip(1)
        .take_while(|l| !l.starts_with("== "))
        .collect()
}

fn assert_no_leftovers(r: &StepResult) {
    for fact in ["cgroups=0", "run_dirs=0", "mounts=0", "processes=0"] {
        assert!(r.stdout.lines().any(|l| l.trim() == fact), "{fact}\n{}", r.explain());
    }
}

#[test]
fn a_forbidden_syscall_kills_the_vmm_with_sigsys_and_isocell_says_so() {
    let r = ok("seccomp-probe");
    // Every thread kind, the device workers included.
    let kinds = ["main", "vcpu", "virtio-blk", "virtio-rng", "virtio-vsock"];
    for kind in kinds {
        let rc = format!("{kind} rc=125");
        assert!(r.stdout.contains(&rc), "{rc}\n{}", r.explain());
    }
    assert_eq!(r.stdout.matches("killed by SIGSYS").count(), kinds.len(), "{}", r.explain());
    assert_no_leftovers(r);
}

#[test]
fn the_jailed_vmm_sees_only_its_own_files_and_runs_unprivileged() {
    let r = ok("jail-view");
    let out = &r.stdout;
    let surface_text = out.split_once("surface-ok").map(|(_, s)| s).unwrap_or_default();
    let json_start = surface_text.find("\n{").unwrap_or(0);
    let surface: serde_json::Value = serde_json::from_str(surface_text[json_start..].trim())
        .unwrap_or_else(|e| panic!("surface is not JSON ({e})\n{}", r.explain()));

    // Exactly the files the surface lists (the jail's /proc shows only its own processes).
    let seen: BTreeSet<&str> =
        section(out, "files").into_iter().filter(|l| !l.is_empty() && *l != "/").collect();
    let listed = surface["jail"]["visible_paths"].as_array().cloned().unwrap_or_default();
    let listed: BTreeSet<&str> = listed.iter().filter_map(|v| v.as_str()).collect();
    let cell_files: BTreeSet<&str> =
        seen.iter().copied().filter(|p| p.starts_with("/cell/")).collect();
    let outside: BTreeSet<&str> = seen.difference(&cell_files).copied().collect();
    assert_eq!(outside, listed, "{}", r.explain());
    let shadow = section(out, "shadow").join("\n");
    assert!(shadow.matches("No such file").count() == 2, "{shadow}\n{}", r.explain());

    let status = section(out, "status").join("\n");
    let uid = surface["jail"]["uid"].as_u64().unwrap_or(0);
    assert!((0x7000_0000..0x7100_0000).contains(&uid), "{uid}");
    assert!(status.contains("NoNewPrivs:\t1"), "{}", r.explain());
    assert!(status.contains("CapEff:\t0000000000000000"), "{}", r.explain());
    assert!(status.contains("Seccomp:\t2"), "{}", r.explain());
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap_or_default();
    assert!(uid_line.split_whitespace().skip(1).all(|u| u != "0"), "{}", r.explain());
    for t in section(out, "threads") {
        assert!(t.ends_with("Seccomp:\t2"), "every VMM thread is filtered: {t}\n{}", r.explain());
    }
    assert_eq!(section(out, "ns").len(), 6, "{}", r.explain());
    let limits = section(out, "limits").join("\n");
    assert!(limits.contains("Max core file size        0"), "{}", r.explain());
    let cgroup = section(out, "cgroup");
    assert!(cgroup.first().is_some_and(|c| c.contains("/isocell/")), "{}", r.explain());
    // Guest memory plus the VMM's allowance (isocell_jail::cgroup::VMM_ALLOWANCE_MIB).
    assert_eq!(cgroup.get(1).copied(), Some(((128 + 112) << 20).to_string().as_str()));
    assert!(out.contains("run rc=0"), "{}", r.explain());
    assert!(out.contains("same rc=0") && out.contains("nojail rc=1"), "{}", r.explain());
}

#[test]
fn a_cell_that_exhausts_its_memory_disturbs_neither_the_host_nor_another_cell() {
    let r = ok("memory-hog");
    assert!(r.stdout.contains("b rc=0") && r.stdout.contains("b-ok"), "{}", r.explain());
    // The guest's own OOM killer ends the hog inside the cell: SIGKILL, 137.
    assert!(r.stdout.contains("hog rc=137"), "{}", r.explain());
    assert!(r.stdout.contains("host=alive") && r.stdout.contains("after-ok"), "{}", r.explain());
    assert_no_leftovers(r);
}

#[test]
fn twenty_cells_some_killed_leave_nothing_behind() {
    let r = ok("twenty-cells");
    let lines: Vec<&str> = r.stdout.lines().filter(|l| l.starts_with("cell ")).collect();
    assert_eq!(lines.len(), 20, "{}", r.explain());
    for l in &lines {
        let killed = l.contains("killed");
        assert_eq!(l.ends_with("rc=0"), !killed, "{l}\n{}", r.explain());
    }
    assert!(r.stdout.contains("final rc=0"), "{}", r.explain());
    assert_no_leftovers(r);
}

#[test]
fn the_manifest_lists_exactly_the_devices_the_guest_enumerates() {
    let r = ok("manifest");
    let (guest, record) = r.stdout.split_once("== record").unwrap_or_default();
    let surface: serde_json::Value = serde_json::from_str(record.trim())
        .unwrap_or_else(|e| panic!("stored surface is not JSON ({e})\n{}", r.explain()));
    let devices = surface["devices"].as_array().cloned().unwrap_or_default();

    // virtio devices: (device type, MMIO base) as the guest found them, from sysfs and iomem.
    let bases: HashMap<&str, u64> = guest
        .lines()
        .filter(|l| l.contains(": virtio-mmio."))
        .filter_map(|l| {
            let (range, name) = l.split_once(" : ")?;
            Some((name.trim(), u64::from_str_radix(range.split('-').next()?, 16).ok()?))
        })
        .collect();
    let mut seen = BTreeSet::new();
    for l in guest.lines().filter(|l| l.starts_with("virtio ")) {
        let f: Vec<&str> = l.split_whitespace().collect();
        let kind = u32::from_str_radix(f[1].trim_start_matches("0x"), 16).unwrap_or(0);
        seen.insert((kind, bases.get(f[2]).copied().unwrap_or(0), f.get(3).copied().unwrap_or("")));
    }
    let type_of = |t: &str| match t {
        "virtio_block" => 2,
        "virtio_rng" => 4,
        "virtio_vsock" => 19,
        _ => 0,
    };
    let listed: BTreeSet<(u32, u64)> = devices
        .iter()
        .filter(|d| d["type"].as_str().is_some_and(|t| t.starts_with("virtio_")))
        .map(|d| {
            (
                type_of(d["type"].as_str().unwrap_or("")),
                d["ranges"][0]["base"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    let found: BTreeSet<(u32, u64)> = seen.iter().map(|(k, b, _)| (*k, *b)).collect();
    assert_eq!(found, listed, "{}", r.explain());
    // Each device's negotiated features are recorded; the guest's own bit string agrees on
    // how many bits are set.
    for d in devices.iter().filter(|d| d["type"].as_str().is_some_and(|t| t.starts_with("virtio_")))
    {
        let negotiated = d["negotiated_features"].as_array().map_or(0, Vec::len);
        let base = d["ranges"][0]["base"].as_u64().unwrap_or(0);
        let bits =
            seen.iter().find(|(_, b, _)| *b == base).map_or(0, |(_, _, f)| f.matches('1').count());
        assert!(
            negotiated > 0 && negotiated == bits,
            "{d}: guest has {bits} bits\n{}",
            r.explain()
        );
    }
    // The serial port the manifest lists is the one the guest's driver claimed.
    let serial =
        devices.iter().find(|d| d["type"] == "serial").map(|d| d["ranges"][0]["base"].as_u64());
    assert_eq!(serial, Some(Some(0x3f8)));
    assert!(guest.lines().any(|l| l.starts_with("03f8-03ff : serial")), "{}", r.explain());
}
