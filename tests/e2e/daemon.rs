//! End-to-end tests of `isocelld` and `isocell cell`: long-lived cells with several commands
//! at once, a terminal, stdin and signals; cells that outlive a `kill -9` of the daemon (and a
//! VMM killed while it is down); 50 concurrent creates against a small capacity. Real cells
//! through the test host, one nested host for the file.

use std::sync::OnceLock;

use isocell_e2e::{result_of, run_scenario, shell_step, value, Results};
use isocell_testhost::{Scenario, Step, StepResult};

/// What every step starts with: a daemon of its own in `$D`, and a check for leftovers.
const PRELUDE: &str = r#"
set -u
# Whatever an earlier step left (it failed half-way): its supervisors end their cells on SIGTERM.
# Only this file's daemons: a long-lived test machine runs one of its own (and serves its
# API and exec channel on 7443 and 7444, so the daemon here takes 17443).
for p in $(pidof isocelld); do grep -q /tmp/icd- /proc/$p/cmdline && kill $p; done
kill $(pidof isocell-supervisor) 2>/dev/null
for i in $(seq 300); do [ -z "$(pidof isocell-supervisor)" ] && break; sleep 0.1; done
D=/tmp/icd-$STEP; rm -rf $D; mkdir -p $D
cat > $D/d.toml <<CONF
socket = "$D/d.sock"
state_dir = "$D/state"
run_dir = "$D/run"
idle_timeout_secs = 0
$EXTRA
CONF
export ISOCELL_HOST=unix://$D/d.sock ISOCELL_STATE_DIR=$D/state
start_daemon() {
  {isocelld} --config $D/d.toml 2>>$D/daemon.log & DPID=$!
  for i in $(seq 300); do [ -S $D/d.sock ] && {isocell} cell ls >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo daemon_did_not_start; cat $D/daemon.log; return 1
}
leftovers() {
  echo leftover_vmms=$(ps -o args | grep -c '^[^ ]*isocell-vm[m]')
  echo leftover_supervisors=$(ps -o args | grep -c '^[^ ]*isocell-superviso[r]')
  echo leftover_cgroups=$(find /sys/fs/cgroup/isocell -mindepth 1 -type d 2>/dev/null | wc -l)
  echo leftover_cell_dirs=$(ls -A $D/run | grep -vc '^supervisors$')
  echo leftover_sockets=$(ls -A $D/run/supervisors 2>/dev/null | grep -c 'sock$')
}
"#;

/// A CA, the daemon's certificate for 127.0.0.1, a client CA and two clients: alice (from the
/// client CA) and mallory (same name, another CA); shell lines that write them under
/// `$D/tls`, and the `[tls]` configuration that uses them.
#[allow(clippy::unwrap_used)] // test set-up: a failure here is a broken test host
fn tls_material(dir: &str) -> (String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        (p.self_signed(&key).unwrap(), key)
    };
    let issue = |by: &(rcgen::Certificate, KeyPair), dn: &[(DnType, &str)], names: &[&str]| {
        let key = KeyPair::generate().unwrap();
        let mut p =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
                .unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        for (t, v) in dn {
            p.distinguished_name.push(t.clone(), *v);
        }
        (p.signed_by(&key, &by.0, &by.1).unwrap().pem(), key.serialize_pem())
    };
    let server_ca = ca("isocelld test CA");
    let client_ca = ca("isocell clients CA");
    let other_ca = ca("someone else's CA");
    let server = issue(&server_ca, &[(DnType::CommonName, "isocelld")], &["127.0.0.1"]);
    let alice = issue(
        &client_ca,
        &[(DnType::CommonName, "alice"), (DnType::OrganizationName, "tenant-a")],
        &[],
    );
    let mallory = issue(&other_ca, &[(DnType::CommonName, "alice")], &[]);
    let mut files = format!("mkdir -p {dir}\n");
    for (name, text) in [
        ("server-ca.pem", server_ca.0.pem()),
        ("client-ca.pem", client_ca.0.pem()),
        ("server.pem", server.0),
        ("server.key", server.1),
        ("alice.pem", alice.0),
        ("alice.key", alice.1),
        ("mallory.pem", mallory.0),
        ("mallory.key", mallory.1),
    ] {
        files.push_str(&format!("cat > {dir}/{name} <<'PEM'\n{text}PEM\n"));
    }
    let config = format!(
        "[tls]\nlisten = '127.0.0.1:17443'\ncert = '{dir}/server.pem'\nkey = '{dir}/server.key'\n\
         client_ca = '{dir}/client-ca.pem'"
    );
    (files, config)
}

fn step(name: &str, extra_config: &str, body: &str, timeout: u64) -> Step {
    let script = format!("STEP={name}\nEXTRA=\"{extra_config}\"\n{PRELUDE}\n{body}");
    shell_step(name, &script, timeout)
}

const API: &str = r#"
start_daemon || exit 1
A=$({isocell} cell create --idempotency-key first) || { echo create_failed; cat $D/daemon.log; exit 1; }
A2=$({isocell} cell create --idempotency-key first)
echo cell=$A retried=$A2
echo cells_after_retry=$({isocell} cell ls | grep -c running)
{isocell} cell exec $A -- sh -c 'for i in $(seq 300); do echo one-$i; done; exit 3' > $D/o1 2> $D/e1 & p1=$!
{isocell} cell exec $A -- sh -c 'for i in $(seq 300); do echo two-$i >&2; done' > $D/o2 2> $D/e2 & p2=$!
{isocell} cell exec $A -- sh -c 'sleep 2; echo three; exit 7' > $D/o3 2> $D/e3 & p3=$!
wait $p1; s1=$?; wait $p2; s2=$?; wait $p3; s3=$?
echo statuses=$s1,$s2,$s3
echo one_lines=$(grep -c '^one-' $D/o1) one_foreign=$(grep -vc '^one-' $D/o1) one_err=$(wc -c < $D/e1)
echo two_lines=$(grep -c '^two-' $D/e2) two_out=$(wc -c < $D/o2)
echo three=$(cat $D/o3)
echo stdin=$(echo hello | {isocell} cell exec -i $A -- sh -c 'read x; echo got-$x')
{isocell} cell exec -t $A -- sh -c 'test -t 0 && echo tty=yes; echo size=$(stty size | tr " " x)' | tr -d '\r'
{isocell} cell exec $A -- sleep 300 & p=$!; sleep 4; kill -INT $p; wait $p; echo sigint_status=$?
{isocell} cell exec $A -- /no/such/program; echo notfound_status=$?
{isocell} cell sessions $A > $D/sessions; echo sessions=$(grep -c . $D/sessions)
mkdir -p $D/up/tree/sub; head -c 3000000 /dev/urandom > $D/up/tree/big.bin; echo nested-file > $D/up/tree/sub/f.txt
{isocell} cell cp $D/up/tree $A:/data; echo cp_in_status=$?
echo hash_host=$(sha256sum $D/up/tree/big.bin | cut -d' ' -f1)
echo hash_in_cell=$({isocell} cell exec $A -- sha256sum /data/tree/big.bin | cut -d' ' -f1)
mkdir -p $D/down; {isocell} cell cp $A:/data/tree $D/down; echo cp_out_status=$?
echo hash_back=$(sha256sum $D/down/tree/big.bin | cut -d' ' -f1) nested=$(cat $D/down/tree/sub/f.txt)
{isocell} cell rm $A > $D/rm; echo rm_status=$?
# The same daemon over TLS: a client known by its certificate's subject, and one from another CA.
tls() { who=$1; shift; {isocell} cell --host https://127.0.0.1:17443 --tls-ca $D/tls/server-ca.pem --tls-cert $D/tls/$who.pem --tls-key $D/tls/$who.key "$@"; }
T=$(tls alice create 2> $D/tls-create) || { echo tls_create_failed; cat $D/tls-create; }
echo tls_exec=$(tls alice exec $T -- echo over-tls)
echo tls_owner=$(tls alice inspect $T | grep '"owner"' | cut -d'"' -f4)
tls alice ls > $D/tls-ls; echo tls_sees=$(grep -c . $D/tls-ls)
tls mallory ls > /dev/null 2> $D/mallory; echo mallory_status=$?; echo "mallory: $(cat $D/mallory)"
tls alice rm $T > /dev/null; echo tls_rm_status=$?
{isocell} cell exec $A -- true 2> $D/after; echo after_rm_status=$?; echo "after_rm: $(cat $D/after)"
kill $DPID; wait $DPID
leftovers
{isocell} audit verify > $D/audit 2>&1; echo audit_status=$?; cat $D/audit
echo audit_alice=$(cat $D/state/audit/* | grep -c 'x509:CN=alice,O=tenant-a')
"#;

const RESTART: &str = r#"
start_daemon || exit 1
ids=""
for i in 1 2 3 4 5; do id=$({isocell} cell create) || { echo create_failed; cat $D/daemon.log; exit 1; }; ids="$ids $id"; done
set -- $ids; first=$1; victim=$2
{isocell} cell exec $first -- sh -c 'echo early; sleep 12; echo late; exit 9' > $D/stream 2>&1 & SP=$!
sleep 4
kill -9 $DPID; wait $DPID 2>/dev/null
wait $SP; echo stream_client_status=$?; echo "stream: $(tr '\n' ' ' < $D/stream)"
start_daemon || exit 1
echo running_after_restart=$({isocell} cell ls | grep -c running)
ok=0; for id in $ids; do {isocell} cell exec $id -- true && ok=$((ok+1)); done; echo usable=$ok
sleep 12
{isocell} cell sessions --json $first > $D/s1
echo streamed_exit_code=$(tr -d ' \n' < $D/s1 | grep -o '"id":1,[^}]*' | grep -o '"exit_code":[0-9]*' | tr -dc 0-9)
vmm=$({isocell} cell inspect $victim | grep '"vmm_pid"' | tr -dc 0-9)
kill -9 $DPID; wait $DPID 2>/dev/null
kill -9 $vmm; echo killed_vmm=$vmm
sleep 5
start_daemon || exit 1
sleep 2
echo victim_outcome=$({isocell} cell inspect $victim | grep '"outcome"' | tr -d ' ",' | cut -d: -f2)
for id in $ids; do {isocell} cell rm $id > /dev/null || echo rm_failed=$id; done
echo ended=$({isocell} cell ls | grep -c ended)
kill $DPID; wait $DPID
leftovers
{isocell} audit verify > $D/audit 2>&1; echo audit_status=$?; cat $D/audit
"#;

const LOAD: &str = r#"
start_daemon || exit 1
pids=""
for i in $(seq 50); do ( timeout 400 {isocell} cell create --memory 256M > $D/c.$i 2> $D/e.$i; echo $? > $D/s.$i ) & pids="$pids $!"; done
# Not a bare `wait`: the daemon is a background job of this shell too.
for p in $pids; do wait $p; done
echo created=$(grep -l '^0$' $D/s.* | wc -l) capacity=$(grep -l 'cannot take a cell' $D/e.* | wc -l) total=$(ls $D/s.* | wc -l)
grep -h 'isocell: error' $D/e.* | grep -v 'cannot take a cell' | sort | uniq -c | head -5
echo running=$({isocell} cell ls | grep -c running) failed=$({isocell} cell ls | grep -c failed) creating=$({isocell} cell ls | grep -c creating)
for f in $D/c.*; do id=$(cat $f); [ -n "$id" ] && {isocell} cell rm $id > /dev/null; done
kill $DPID; wait $DPID
leftovers
"#;

fn scenario() -> Scenario {
    // Room for three 256 MiB cells: the nested host's memory less three cells and a little.
    let three_cells = "reserved_memory_mib = $(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) - 3 * 256 - 100 ))";
    // The api step's directory is /tmp/icd-api (PRELUDE: D=/tmp/icd-$STEP).
    let (tls_files, tls_config) = tls_material("/tmp/icd-api/tls");
    Scenario {
        steps: vec![
            step("api", &tls_config, &format!("{tls_files}{API}"), 600),
            // Five one-vCPU cells on the nested host's one CPU.
            step("restart", "cpu_overcommit = 8.0", RESTART, 900),
            step("load", three_cells, LOAD, 900),
        ],
        ..Scenario::default()
    }
}

fn results() -> &'static Results {
    static RESULTS: OnceLock<Results> = OnceLock::new();
    RESULTS.get_or_init(|| run_scenario("isocelld", &scenario()))
}

fn assert_nothing_left(r: &StepResult) {
    for k in [
        "leftover_vmms",
        "leftover_supervisors",
        "leftover_cgroups",
        "leftover_cell_dirs",
        "leftover_sockets",
    ] {
        assert_eq!(value(r, k), "0", "{k}: {}", r.explain());
    }
}

#[test]
fn a_long_lived_cell_runs_many_commands_through_the_api() {
    let r = result_of(results(), "api");
    assert_eq!(r.exit_code, Some(0), "{}", r.explain());
    assert_eq!(value(r, "cell"), value(r, "retried"), "a retried create made a second cell");
    assert_eq!(value(r, "cells_after_retry"), "1");
    assert_eq!(value(r, "statuses"), "3,0,7", "{}", r.explain());
    assert_eq!(value(r, "one_lines"), "300", "{}", r.explain());
    assert_eq!((value(r, "one_foreign"), value(r, "one_err")), ("0".into(), "0".into()));
    assert_eq!((value(r, "two_lines"), value(r, "two_out")), ("300".into(), "0".into()));
    assert_eq!(value(r, "three"), "three");
    assert_eq!(value(r, "stdin"), "got-hello", "{}", r.explain());
    assert_eq!(value(r, "tty"), "yes", "{}", r.explain());
    assert_eq!(value(r, "sigint_status"), "130", "{}", r.explain());
    assert_eq!(value(r, "notfound_status"), "127", "{}", r.explain());
    assert_eq!(
        (value(r, "cp_in_status"), value(r, "cp_out_status")),
        ("0".into(), "0".into()),
        "{}",
        r.explain()
    );
    let host = value(r, "hash_host");
    assert_eq!(value(r, "hash_in_cell"), host, "{}", r.explain());
    assert_eq!(value(r, "hash_back"), host, "{}", r.explain());
    assert_eq!(value(r, "nested"), "nested-file");
    assert_eq!(value(r, "rm_status"), "0", "{}", r.explain());
    assert_eq!(value(r, "tls_exec"), "over-tls", "{}", r.explain());
    assert_eq!(value(r, "tls_owner"), "x509:CN=alice,O=tenant-a", "{}", r.explain());
    assert_eq!(value(r, "tls_sees"), "2", "alice sees her cell only (and the header)");
    assert_ne!(value(r, "mallory_status"), "0", "{}", r.explain());
    assert!(r.stdout.contains("mallory: isocell: error: the daemon at https://127.0.0.1:17443"));
    assert_eq!(value(r, "tls_rm_status"), "0", "{}", r.explain());
    assert!(value(r, "audit_alice").parse::<u32>().is_ok_and(|n| n >= 2), "{}", r.explain());
    assert_ne!(value(r, "after_rm_status"), "0", "{}", r.explain());
    assert!(r.stdout.contains("after_rm: isocell: error:"), "{}", r.explain());
    assert_eq!(value(r, "audit_status"), "0", "{}", r.explain());
    assert_nothing_left(r);
}

#[test]
fn cells_outlive_a_killed_daemon_and_a_dead_vmm_is_reconciled() {
    let r = result_of(results(), "restart");
    assert_eq!(r.exit_code, Some(0), "{}", r.explain());
    assert_eq!(value(r, "running_after_restart"), "5", "{}", r.explain());
    assert_eq!(value(r, "usable"), "5", "{}", r.explain());
    assert_eq!(value(r, "streamed_exit_code"), "9", "{}", r.explain());
    assert_eq!(value(r, "victim_outcome"), "vmm_killed", "{}", r.explain());
    assert_eq!(value(r, "ended"), "5", "{}", r.explain());
    assert!(!r.stdout.contains("rm_failed="), "{}", r.explain());
    assert_eq!(value(r, "audit_status"), "0", "{}", r.explain());
    assert_nothing_left(r);
}

#[test]
fn concurrent_creates_beyond_capacity_either_run_or_are_refused_whole() {
    let r = result_of(results(), "load");
    assert_eq!(r.exit_code, Some(0), "{}", r.explain());
    let created: u32 = value(r, "created").parse().unwrap_or(0);
    let refused: u32 = value(r, "capacity").parse().unwrap_or(0);
    assert_eq!(value(r, "total"), "50");
    assert_eq!(
        created + refused,
        50,
        "each create ran or was refused for capacity: {}",
        r.explain()
    );
    assert!((1..=3).contains(&created), "{}", r.explain());
    assert_eq!(value(r, "running"), created.to_string(), "{}", r.explain());
    assert_eq!(
        (value(r, "failed"), value(r, "creating")),
        ("0".into(), "0".into()),
        "{}",
        r.explain()
    );
    assert_nothing_left(r);
}
