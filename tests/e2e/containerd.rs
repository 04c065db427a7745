//! End-to-end tests of `containerd-shim-isocell-v2` under Debian's containerd (1.6, task API
//! v2) in the test host: with `ctr`, an image imported from an OCI archive built here, run in
//! cells (output and exit statuses, execs, each signal, metrics, a denial by policy, containerd
//! killed and restarted while a cell runs); through containerd's CRI plugin, the calls kubelet
//! makes for a pod (`isocell-cri`); nothing left behind. One nested host for the file.

use std::sync::OnceLock;

use isocell_e2e::{result_of, run_scenario, shell_step, value, Results};
use isocell_testhost::containerd;
use isocell_testhost::{Scenario, StepResult};

const CTR: &str = r#"
ctr run --rm $R $IMG t1 sh -c 'echo hello-from-cell; echo to-stderr >&2; exit 3' > $D/o1 2> $D/e1
echo run_status=$?
echo run_out=$(cat $D/o1) run_err=$(cat $D/e1)
echo args_env=$(ctr run --rm $R --env GREETING=hi --cwd /tmp $IMG t1b sh -c 'echo $GREETING-$(pwd)-$(id -u)')
ctr run -d $R $IMG t2 sleep 600 > /dev/null 2> $D/e2; echo detached_status=$?
echo t2_state=$(ctr task ls | awk '$1=="t2" {print $3}')
echo exec_out=$(ctr task exec --exec-id e1 t2 sh -c 'echo exec-$((6*7))')
ctr task exec --exec-id e2 t2 sh -c 'exit 5'; echo exec_status=$?
echo stdin_out=$(echo piped | ctr task exec --exec-id e3 t2 sh -c 'read x; echo got-$x')
echo pids=$(ctr task ps t2 | tail -n +2 | wc -l)
ctr task metrics t2 > $D/metrics 2>&1; echo metrics_status=$?; echo metrics_memory=$(grep -c -i memory $D/metrics)
# Each signal to an exec: its status is 128 + the signal, as runc reports it.
for sig in TERM INT HUP USR1; do
  ctr task exec --exec-id s-$sig t2 sleep 600 & EP=$!
  sleep 3
  ctr task kill -s SIG$sig --exec-id s-$sig t2; wait $EP; echo exec_sig_$sig=$?
done
ctr task kill -s SIGKILL --exec-id nosuch t2 2> $D/nosuch; echo kill_unknown_status=$?
# The container's own process: SIGTERM through a foreground `ctr run`, SIGKILL to a detached one.
ctr run --rm $R $IMG t3 sleep 600 & RP=$!
for i in $(seq 300); do [ "$(ctr task ls | awk '$1=="t3" {print $3}')" = RUNNING ] && break; sleep 0.2; done
ctr task kill -s SIGTERM t3; wait $RP; echo main_sigterm=$?
ctr task kill -s SIGKILL t2
for i in $(seq 300); do [ "$(ctr task ls | awk '$1=="t2" {print $3}')" = STOPPED ] && break; sleep 0.2; done
echo t2_after_kill=$(ctr task ls | awk '$1=="t2" {print $3}')
ctr task kill -s SIGKILL t2 2> /dev/null; echo kill_stopped_status=$?
ctr task delete t2 2> $D/del; echo delete_status=$?
echo delete_says=$(grep -o 'exit code [0-9]*' $D/del | tr ' ' _)
ctr container rm t2; echo container_rm_status=$?
# A read-only volume stays read-only, even to root in the cell; a writable one takes writes.
# The spec's capabilities (ctr's default: runc's set, without CAP_SYS_ADMIN) bound the command.
mkdir -p $D/vol; echo volume-data > $D/vol/f
RO="type=bind,src=$D/vol,dst=/data,options=rbind:ro"
ctr run --rm $R --mount $RO $IMG t4 sh -c 'cat /data/f; echo x 2>&1 > /data/f; mount -o remount,rw /data 2>&1; echo y 2>&1 > /data/f; cat /data/f; grep -E "^(CapBnd|NoNewPrivs)" /proc/self/status' > $D/ro 2>&1
echo "ro_volume: $(tr '\n' ' ' < $D/ro)"
echo ro_refusals=$(grep -c 'Read-only file system' $D/ro)
echo ro_kept=$(grep -c '^volume-data$' $D/ro)
echo cap_bounding=$(awk '$1=="CapBnd:" {print $2}' $D/ro)
echo rw_volume=$(ctr run --rm $R --mount type=bind,src=$D/vol,dst=/scratch,options=rbind:rw $IMG t5 sh -c 'echo z > /scratch/f && cat /scratch/f')
# Denied by policy: a pod limited to a jurisdiction this host is not in.
ctr run --rm $R --annotation isocell.io/jurisdiction=mars $IMG d1 true > /dev/null 2> $D/denied
echo denied_status=$?; echo "denied: $(tr '\n' ' ' < $D/denied)"
ctr container rm d1 > /dev/null 2>&1
echo containers_left=$(ctr container ls -q | wc -l)
echo receipts=$(ls $ISOCELL_STATE_DIR/cells | wc -l)
echo converted_images=$(ls $ISOCELL_STATE_DIR/images/images | wc -l)
echo workload_in_receipts=$(cat $ISOCELL_STATE_DIR/cells/*/launch.json | grep -c '"containerd"')
{isocell} audit verify > $D/audit 2>&1; echo audit_status=$?; tail -3 $D/audit
sleep 1
leftovers
grep -h "shut down\|teardown check\|level=warn\|level=error\|panicked\|connect from\|shutdown asked" $D/containerd.log | grep -v "devmapper\|cni\|aufs\|btrfs\|zfs\|working directory" | tail -12 | sed "s/^/shim_log: /"
kill $CPID; wait $CPID
"#;

const RESTART: &str = r#"
ctr run -d $R $IMG r1 sh -c 'echo started; sleep 600' > /dev/null; echo run_status=$?
for i in $(seq 300); do [ "$(ctr task ls | awk '$1=="r1" {print $3}')" = RUNNING ] && break; sleep 0.2; done
sleep 2
kill -9 $CPID; wait $CPID 2>/dev/null
echo shims_while_down=$(ps -o args | grep -c '^[^ ]*containerd-shim-isocell-v[2]')
start_containerd || exit 1
echo r1_state=$(ctr task ls | awk '$1=="r1" {print $3}')
echo exec_after_restart=$(ctr task exec --exec-id a1 r1 echo still-here)
ctr task kill -s SIGKILL r1
for i in $(seq 300); do [ "$(ctr task ls | awk '$1=="r1" {print $3}')" = STOPPED ] && break; sleep 0.2; done
ctr task delete r1 2> $D/del; echo delete_status=$?
echo delete_says=$(grep -o 'exit code [0-9]*' $D/del | tr ' ' _)
ctr container rm r1
sleep 1
leftovers
grep -h "shut down\|teardown check\|level=warn\|level=error\|panicked\|connect from\|shutdown asked" $D/containerd.log | grep -v "devmapper\|cni\|aufs\|btrfs\|zfs\|working directory" | tail -12 | sed "s/^/shim_log: /"
kill $CPID; wait $CPID
"#;

const CRI_STEPS: &str = r#"
mkdir -p $D/logs $D/config; echo from-configmap > $D/config/setting
cri() { {cri} --log-dir $D/logs "$@"; }
cri --handler isocell --image $IMG --name web --namespace prod --uid u-42 --config-dir $D/config \
  -- sh -c 'echo log-line-$((40+2)); echo err-line >&2; sleep 600' > $D/pod 2>&1
cat $D/pod
grep -q '^cri_runtime=' $D/pod || grep -i 'cri\|level=error' $D/containerd.log | tail -15
echo log_lines=$(grep -c 'stdout F log-line-42' $D/logs/app.log 2>/dev/null)
echo err_lines=$(grep -c 'stderr F err-line' $D/logs/app.log 2>/dev/null)
echo pod_in_receipt=$(cat $ISOCELL_STATE_DIR/cells/*/launch.json 2>/dev/null | grep -c '"u-42"')
cri --handler isocell --image $IMG --name shady --namespace prod --uid u-666 \
  --annotation isocell.io/jurisdiction=mars -- sleep 600 > $D/denied 2>&1
echo "denied_pod: $(grep '^failed=' $D/denied)"
echo denied_removed=$(grep -c '^remove_pod=ok' $D/denied)
sleep 1
echo leftover_pods=$(ctr -n k8s.io task ls -q | wc -l)
leftovers
kill $CPID; wait $CPID
"#;

fn results() -> &'static Results {
    static RESULTS: OnceLock<Results> = OnceLock::new();
    RESULTS.get_or_init(|| {
        let tmp = std::env::temp_dir().join(format!("isocell-ctd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| e.to_string())?;
        let files = containerd::files(&tmp)?;
        let step = |name: &str, cri: bool, body: &str| {
            shell_step(name, &containerd::script(name, cri, body), 900)
        };
        let scenario = Scenario {
            steps: vec![
                step("ctr", false, CTR),
                step("restart", false, RESTART),
                step("cri", true, CRI_STEPS),
            ],
            files,
        };
        let r = run_scenario("containerd", &scenario);
        let _ = std::fs::remove_dir_all(&tmp);
        r
    })
}

fn assert_nothing_left(r: &StepResult) {
    for k in [
        "leftover_vmms",
        "leftover_shims",
        "leftover_cgroups",
        "leftover_cell_dirs",
        "leftover_mounts",
        "leftover_bundles",
    ] {
        assert_eq!(value(r, k), "0", "{k}: {}", r.explain());
    }
}

#[test]
fn ctr_runs_containers_in_cells_with_runc_exit_statuses() {
    let r = result_of(results(), "ctr");
    assert_eq!(r.exit_code, Some(0), "{}", r.explain());
    assert_eq!(value(r, "run_status"), "3", "{}", r.explain());
    assert_eq!(value(r, "run_out"), "hello-from-cell", "{}", r.explain());
    assert_eq!(value(r, "run_err"), "to-stderr", "{}", r.explain());
    assert_eq!(value(r, "args_env"), "hi-/tmp-0", "{}", r.explain());
    assert_eq!(value(r, "detached_status"), "0", "{}", r.explain());
    assert_eq!(value(r, "t2_state"), "RUNNING", "{}", r.explain());
    assert_eq!(value(r, "exec_out"), "exec-42", "{}", r.explain());
    assert_eq!(value(r, "exec_status"), "5", "{}", r.explain());
    assert_eq!(value(r, "stdin_out"), "got-piped", "{}", r.explain());
    assert_eq!(value(r, "pids"), "1", "the host sees the cell's VMM: {}", r.explain());
    assert_eq!(value(r, "metrics_status"), "0", "{}", r.explain());
    for (sig, status) in [("TERM", "143"), ("INT", "130"), ("HUP", "129"), ("USR1", "138")] {
        assert_eq!(value(r, &format!("exec_sig_{sig}")), status, "SIG{sig}: {}", r.explain());
    }
    assert_ne!(value(r, "kill_unknown_status"), "0", "{}", r.explain());
    assert_eq!(value(r, "main_sigterm"), "143", "{}", r.explain());
    assert_eq!(value(r, "t2_after_kill"), "STOPPED", "{}", r.explain());
    assert_ne!(value(r, "kill_stopped_status"), "0", "a stopped task cannot be killed");
    assert_eq!(value(r, "delete_status"), "0", "{}", r.explain());
    assert_eq!(value(r, "delete_says"), "exit_code_137", "{}", r.explain());
    assert_eq!(value(r, "container_rm_status"), "0", "{}", r.explain());
    assert_eq!(value(r, "containers_left"), "0", "{}", r.explain());
    assert_eq!(value(r, "audit_status"), "0", "{}", r.explain());
    assert_nothing_left(r);
}

#[test]
fn read_only_volumes_and_the_specs_capabilities_hold_in_the_cell() {
    let r = result_of(results(), "ctr");
    // Both writes are refused (before and after a remount attempt) and the content is kept.
    assert_eq!(value(r, "ro_refusals"), "2", "{}", r.explain());
    assert_eq!(value(r, "ro_kept"), "2", "{}", r.explain());
    // runc's default set, as ctr asks: no CAP_SYS_ADMIN, so no remounting.
    assert_eq!(value(r, "cap_bounding"), "00000000a80425fb", "{}", r.explain());
    assert_eq!(value(r, "rw_volume"), "z", "a writable volume takes writes: {}", r.explain());
}

#[test]
fn a_denied_container_names_the_policy_and_starts_nothing() {
    let r = result_of(results(), "ctr");
    assert_ne!(value(r, "denied_status"), "0", "{}", r.explain());
    assert!(r.stdout.contains("denied") && r.stdout.contains("jurisdiction"), "{}", r.explain());
    // Receipts: t1, t1b, t2, t3, t4, t5 launched; the denied one has a record of its denial only.
    let receipts: u32 = value(r, "receipts").parse().unwrap_or(0);
    assert!(receipts >= 6, "{}", r.explain());
    assert_eq!(
        value(r, "workload_in_receipts"),
        "6",
        "each launch names its container: {}",
        r.explain()
    );
    assert_eq!(
        value(r, "converted_images"),
        "1",
        "seven containers of one image, one conversion: {}",
        r.explain()
    );
}

#[test]
fn cells_outlive_a_restart_of_containerd() {
    let r = result_of(results(), "restart");
    assert_eq!(r.exit_code, Some(0), "{}", r.explain());
    assert_eq!(value(r, "run_status"), "0", "{}", r.explain());
    assert_eq!(value(r, "shims_while_down"), "1", "{}", r.explain());
    assert_eq!(value(r, "r1_state"), "RUNNING", "{}", r.explain());
    assert_eq!(value(r, "exec_after_restart"), "still-here", "{}", r.explain());
    assert_eq!(value(r, "delete_status"), "0", "{}", r.explain());
    assert_eq!(value(r, "delete_says"), "exit_code_137", "{}", r.explain());
    assert_nothing_left(r);
}

#[test]
fn kubelets_calls_run_a_pod_whose_container_is_a_cell() {
    let r = result_of(results(), "cri");
    assert_eq!(r.exit_code, Some(0), "{}", r.explain());
    assert_eq!(value(r, "cri_runtime"), "containerd", "{}", r.explain());
    assert_eq!(value(r, "state"), "CONTAINER_RUNNING", "{}", r.explain());
    assert_eq!(value(r, "exec_stdout"), "exec-hi,from-configmap", "{}", r.explain());
    assert_eq!(value(r, "exec_exit"), "0", "{}", r.explain());
    assert_eq!(value(r, "exec_exit_4"), "4", "{}", r.explain());
    assert_eq!(value(r, "config_write"), "refused_read_only", "{}", r.explain());
    assert_eq!(value(r, "config_after_write"), "from-configmap", "{}", r.explain());
    assert_ne!(value(r, "stats_memory_bytes"), "0", "{}", r.explain());
    assert_eq!(value(r, "stopped_state"), "CONTAINER_EXITED", "{}", r.explain());
    assert_eq!(value(r, "exit_code"), "143", "StopContainer sends SIGTERM: {}", r.explain());
    assert_eq!(value(r, "removed"), "ok", "{}", r.explain());
    assert_eq!(value(r, "log_lines"), "1", "crictl logs reads this file: {}", r.explain());
    assert_eq!(value(r, "err_lines"), "1", "{}", r.explain());
    assert!(value(r, "pod_in_receipt").parse::<u32>().is_ok_and(|n| n >= 1), "{}", r.explain());
    assert!(r.stdout.contains("denied_pod: failed=StartContainer"), "{}", r.explain());
    assert!(r.stdout.contains("jurisdiction"), "the deciding policy is named: {}", r.explain());
    assert_eq!(value(r, "denied_removed"), "1", "{}", r.explain());
    for k in ["leftover_pods", "leftover_vmms", "leftover_shims", "leftover_cgroups"] {
        assert_eq!(value(r, k), "0", "{k}: {}", r.explain());
    }
    assert_eq!(value(r, "leftover_cell_dirs"), "0", "{}", r.explain());
    assert_eq!(value(r, "leftover_mounts"), "0", "{}", r.explain());
}
