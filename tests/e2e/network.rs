//! The cell's network, end to end: real cells, a real HTTP server (busybox httpd, with a CGI
//! that hashes uploads) on an address the test gives the loopback of a network namespace it
//! makes (so nothing outside is ever contacted, on the nested host or on a real one), and the
//! name `payload.test` known only to that namespace's /etc/hosts. All cells run in one
//! scenario, so the nested host boots once for this file.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use isocell_e2e::{result_of, run_scenario, shell_step, Results};
use isocell_testhost::{Scenario, StepResult};
use serde_json::Value;

/// The HTTP server's address and port, and the payload's size (64 MiB, each way).
const SERVER: &str = "10.99.0.1";
const PORT: u16 = 8080;
const PAYLOAD: u64 = 64 << 20;

/// Runs `body` (more shell) in a new mount and network namespace with the server up: the
/// loopback holds 10.99.0.1, `payload.test` names it, httpd serves `{work}/www`. Then prints
/// the audit log's network events (only their count with `count_only`: a flood has too many
/// for the step's output), the exit receipts, and what is left behind.
fn in_namespace(body: &str, count_only: bool) -> String {
    let events = if count_only {
        "echo network_events=$(grep -c '\"kind\":\"network\"' {work}/state/audit/audit.log); \
         echo suppressed_entries=$(grep -c '\"kind\":\"network_suppressed\"' {work}/state/audit/audit.log);"
    } else {
        "echo network_events_begin; grep -h '\"kind\":\"network\"' {work}/state/audit/audit.log; echo network_events_end;"
    };
    format!(
        "cd {{work}} && mkdir -p www/cgi-bin && head -c {PAYLOAD} /dev/urandom > www/payload.bin && \
         echo small-file > www/small.txt && \
         printf '#!/bin/sh\\necho Content-Type: text/plain\\necho\\nhead -c \"$CONTENT_LENGTH\" | sha256sum\\n' > www/cgi-bin/up && \
         chmod +x www/cgi-bin/up && echo payload_sha=$(sha256sum www/payload.bin | cut -d' ' -f1) && \
         echo '{SERVER} payload.test' > hosts && cat > ns.sh <<'NS'
ip link set lo up && ip addr add {SERVER}/32 dev lo || echo netns=failed
mkdir -p /etc && touch /etc/hosts && mount --bind {{work}}/hosts /etc/hosts || echo hosts=failed
busybox httpd -f -p {SERVER}:{PORT} -h {{work}}/www & httpd=$!
run='env ISOCELL_RUN_DIR={{work}}/run ISOCELL_STATE_DIR={{work}}/state {{isocell}} run'
{body}
kill $httpd
NS
unshare -mn sh ns.sh; \
{events} \
for f in {{work}}/state/cells/*/exit.json; do echo receipt=$(tr -d '\\n' < $f); done; \
ISOCELL_STATE_DIR={{work}}/state {{isocell}} audit verify >/dev/null && echo audit=ok; \
echo leftover_vmms=$(ps -o args | grep -c '^[^ ]*isocell-vm[m]'); \
echo leftover_files=$(ls -A {{work}}/run | wc -l)"
    )
}

/// What the cell does in the egress step.
const EGRESS_GUEST: &str = "echo resolv=$(grep -c '^nameserver 127.0.0.1' /etc/resolv.conf)
echo download_sha=$(wget -q -O- http://payload.test:8080/payload.bin | sha256sum | cut -d' ' -f1)
head -c 67108864 /dev/urandom | tr '\\000' '\\001' > /tmp/up
echo upload_sha=$(sha256sum /tmp/up | cut -d' ' -f1)
echo upload_echo=$(wget -q -O- --post-file /tmp/up http://payload.test:8080/cgi-bin/up | cut -d' ' -f1)
rm /tmp/up
t=$(date +%s); wget -q -O- http://payload.test:8081/ >/dev/null 2>&1; echo denied_port=$? secs=$(( $(date +%s) - t ))
t=$(date +%s); wget -q -O- http://192.0.2.1:8080/ >/dev/null 2>&1; echo denied_ip=$? secs=$(( $(date +%s) - t ))
t=$(date +%s); wget -q -O- http://other.test:8080/ >/dev/null 2>&1; echo denied_name=$? secs=$(( $(date +%s) - t ))
t=$(date +%s); wget -q -O- --header 'Host: other.test' http://payload.test:8080/small.txt >/dev/null 2>&1; echo denied_host=$? secs=$(( $(date +%s) - t ))
nslookup other.test 127.0.0.1 >/tmp/ns 2>&1; echo nslookup_other=$?
echo small=$(wget -q -O- http://payload.test:8080/small.txt)
";

/// What the cell serves in the published-port step: a 512 KiB blob on port 80 (a small HTTP
/// server with a listen backlog for 100 clients: busybox httpd's 9 drops SYNs that TCP then
/// retries for longer than the test waits), and port 81, where one connection tells it to end.
/// The server writes a whole response into its socket and closes it; what the relay has not
/// carried out yet stays in the cell kernel's TCP memory, whose limit comes from the cell's
/// memory. Past it the kernel resets closed connections that still hold bytes ("TCP: out of
/// memory" in the cell's log), as any Linux does: 100 MiB at once did not fit a 128 MiB cell
/// under load. So this cell has 512 MiB for at most 50 MiB in flight.
const PUBLISH_GUEST: &str = "head -c 524288 /dev/urandom > /tmp/blob
echo blob_sha=$(sha256sum /tmp/blob | cut -d' ' -f1)
/hostile http-serve 80 /tmp/blob >/dev/null 2>&1 & server=$!
nc -l -p 81 >/dev/null
kill $server
echo guest_done
";

fn scenario() -> Scenario {
    let egress = in_namespace(&format!(
        "cat > {{work}}/guest.sh <<'G'\n{EGRESS_GUEST}G\n\
         $run --memory 512M --egress payload.test:{PORT} --input {{work}}/guest.sh:/guest.sh -- sh /guest.sh; echo status=$?"
    ), false);
    let publish = in_namespace(&format!(
        "cat > {{work}}/g.sh <<'G'\n{PUBLISH_GUEST}G\n\
         $run --memory 512M --publish 8080:80 --publish 8081:81 --input {{hostile}}:/hostile --input {{work}}/g.sh:/g.sh -- sh /g.sh > {{work}}/cell.out 2>&1 & cell=$!
i=0; until wget -q -O /dev/null http://127.0.0.1:8080/blob 2>/dev/null; do i=$((i+1)); [ $i -gt 180 ] && break; sleep 1; done
echo ready_after=$i
mkdir -p {{work}}/fetched
pids=''; for n in $(seq 1 100); do (wget -q -O- http://127.0.0.1:8080/blob | sha256sum | cut -d' ' -f1 > {{work}}/fetched/$n) & pids=\"$pids $!\"; done
for p in $pids; do wait $p; done
echo fetched=$(cat {{work}}/fetched/* | sort | uniq -c | tr -s ' ')
mkdir -p {{work}}/half
pids=''; for n in $(seq 1 10); do ({{hostile}} http-get-half-closed 127.0.0.1:8080 /blob > {{work}}/half/$n.body; echo $? > {{work}}/half/$n.rc) & pids=\"$pids $!\"; done
for p in $pids; do wait $p; done
echo half_closed=$(for n in $(seq 1 10); do echo $(cat {{work}}/half/$n.rc)/$(sha256sum < {{work}}/half/$n.body | cut -d' ' -f1); done | sort | uniq -c | tr -s ' ')
echo bye | nc 127.0.0.1 8081
wait $cell; echo status=$?
cat {{work}}/cell.out"
    ), false);
    // A second cell starts once the attacker's flood is over, while it holds 120 relayed
    // streams and a server it never reads (its phases 3 and 4), and must still fetch a file.
    let hostile = in_namespace(&format!(
        "$run --memory 512M --egress {SERVER}:{PORT} --input {{hostile}}:/hostile -- /hostile net-abuse {SERVER}:{PORT} > {{work}}/abuse.out & cell=$!
peak=0; (i=0; until grep -q flood_failed= {{work}}/abuse.out 2>/dev/null || [ $i -gt 600 ]; do sleep 0.2; i=$((i+1)); done
 kill -0 $cell 2>/dev/null && echo yes > {{work}}/other.during
 $run --egress {SERVER}:{PORT} -- wget -q -O- http://{SERVER}:{PORT}/small.txt > {{work}}/other.out 2>&1; echo $? > {{work}}/other.status) & other=$!
while kill -0 $cell 2>/dev/null; do r=$(grep VmRSS /proc/$cell/status 2>/dev/null | tr -s ' ' | cut -d' ' -f2); [ -n \"$r\" ] && [ $r -gt $peak ] && peak=$r; sleep 1; done
wait $cell; echo status=$?; cat {{work}}/abuse.out
wait $other; echo other_cell=$(cat {{work}}/other.status) $(cat {{work}}/other.out)
echo other_during_abuse=$(cat {{work}}/other.during 2>/dev/null || echo no)
echo host_rss_peak_kib=$peak"
    ), true);
    let isocell = "ISOCELL_STATE_DIR={work}/state {isocell}";
    let none = format!(
        "ISOCELL_RUN_DIR={{work}}/run {isocell} run -- sh -c 'cat /etc/resolv.conf; \
         wget -q -O- http://192.0.2.1/ >/dev/null 2>&1; echo wget=$?; \
         nslookup payload.test 127.0.0.1 >/dev/null 2>&1; echo nslookup=$?'; echo status=$?; \
         echo stored=$(grep -o '\"network\": *\"none\"' {{work}}/state/cells/*/surface.json); \
         {isocell} surface > {{work}}/none.json; echo planned=$(grep -o '\"network\": *\"none\"' {{work}}/none.json); \
         {isocell} surface --egress payload.test:443 --publish 8080:80 --diff {{work}}/none.json; echo diff=$?; \
         echo vsock_listeners=$(ls {{work}}/run 2>/dev/null | wc -l)"
    );
    Scenario {
        steps: vec![
            shell_step("egress", &egress, 900),
            shell_step("publish", &publish, 900),
            shell_step("hostile-network", &hostile, 900),
            shell_step("no-network", &none, 300),
        ],
        ..Default::default()
    }
}

fn results() -> &'static Results {
    static RESULTS: OnceLock<Results> = OnceLock::new();
    RESULTS.get_or_init(|| run_scenario("network", &scenario()))
}

/// The step's `key=value` lines (the first value of each key).
fn values(r: &StepResult) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in r.stdout.lines() {
        if let Some((k, v)) = line.split_once('=') {
            if !k.contains(' ') {
                out.entry(k.to_owned()).or_insert_with(|| v.to_owned());
            }
        }
    }
    out
}

/// The audit log's network events that the step printed.
fn events(r: &StepResult) -> Vec<Value> {
    r.stdout
        .lines()
        .skip_while(|l| *l != "network_events_begin")
        .skip(1)
        .take_while(|l| *l != "network_events_end")
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|e| e["data"].clone())
        .collect()
}

/// The network totals of the step's busiest cell (by connections), from its exit receipt.
fn receipt_network(r: &StepResult) -> Value {
    let busy = |n: &Value| {
        ["egress_allowed", "egress_denied", "ingress"]
            .iter()
            .filter_map(|k| n[k].as_u64())
            .sum::<u64>()
    };
    r.stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l.strip_prefix("receipt=")?).ok())
        .map(|doc| doc["receipt"]["facts"]["network"].clone())
        .max_by_key(busy)
        .unwrap_or(Value::Null)
}

fn step(name: &str) -> (&'static StepResult, BTreeMap<String, String>) {
    let r = result_of(results(), name);
    let v = values(r);
    let context = format!("{name}: {}\nstderr: {}", r.stdout, r.stderr);
    assert_eq!(v.get("status").map(String::as_str), Some("0"), "{context}");
    assert_eq!(v.get("leftover_vmms").map(String::as_str).unwrap_or("0"), "0", "{context}");
    (r, v)
}

/// Seconds a refusal took, from `denied_x=STATUS secs=N`; a wget that waited for a timeout
/// would take far longer than the 10 s here (its connect timeout is minutes).
fn refused_at_once(v: &BTreeMap<String, String>, key: &str, context: &str) {
    let value = v.get(key).unwrap_or_else(|| panic!("no {key}: {context}"));
    let (status, secs) = value.split_once(" secs=").unwrap_or_else(|| panic!("{key}={value}"));
    assert_ne!(status, "0", "{key} must fail: {context}");
    let secs: u64 = secs.parse().unwrap_or(u64::MAX);
    assert!(secs < 10, "{key} took {secs} s: a hang, not a refusal: {context}");
}

#[test]
fn an_allowed_name_moves_64_mib_each_way_intact_and_the_rest_is_refused_at_once() {
    let (r, v) = step("egress");
    let context = format!("{}\n{}", r.stdout, r.stderr);
    assert_eq!(v.get("resolv").map(String::as_str), Some("1"), "{context}");
    let payload = v.get("payload_sha").expect("payload hash");
    assert_eq!(v.get("download_sha"), Some(payload), "download: {context}");
    let up = v.get("upload_sha").expect("upload hash");
    assert_eq!(v.get("upload_echo"), Some(up), "upload: {context}");
    for key in ["denied_port", "denied_ip", "denied_name", "denied_host"] {
        refused_at_once(&v, key, &context);
    }
    assert_ne!(v.get("nslookup_other").map(String::as_str), Some("0"), "NXDOMAIN: {context}");
    assert_eq!(v.get("small").map(String::as_str), Some("small-file"), "{context}");
    assert_eq!(v.get("audit").map(String::as_str), Some("ok"), "{context}");
}

#[test]
fn every_connection_is_an_audit_event_and_the_receipt_totals_match() {
    let (r, _) = step("egress");
    let events = events(r);
    let context = format!("{}\n{events:#?}", r.stdout);
    let allowed: Vec<&Value> = events.iter().filter(|e| e["verdict"] == "allowed").collect();
    let denied: Vec<&Value> = events.iter().filter(|e| e["verdict"] == "denied").collect();
    // Download, upload, small.txt; refused: the port, the address and the Host header.
    assert_eq!(allowed.len(), 3, "{context}");
    assert!(denied.len() >= 3, "{context}");
    for e in &allowed {
        assert_eq!(e["name"], "payload.test", "{context}");
        assert_eq!(e["rule"], format!("payload.test:{PORT}"), "{context}");
        assert_eq!(e["dest"], format!("{SERVER}:{PORT}"), "{context}");
    }
    let n = |e: &Value, k: &str| e[k].as_u64().unwrap_or(0);
    assert!(allowed
        .iter()
        .any(|e| n(e, "bytes_in") > PAYLOAD && n(e, "bytes_in") < PAYLOAD + 4096));
    assert!(allowed
        .iter()
        .any(|e| n(e, "bytes_out") > PAYLOAD && n(e, "bytes_out") < PAYLOAD + 4096));
    assert!(denied.iter().any(|e| e["dest"] == "192.0.2.1:8080"), "{context}");
    assert!(
        denied.iter().any(|e| e["reason"].as_str().unwrap_or("").contains("HTTP Host")),
        "{context}"
    );
    let totals = receipt_network(r);
    let sum = |k: &str| events.iter().map(|e| n(e, k)).sum::<u64>();
    assert_eq!(totals["egress_allowed"], 3, "{totals}");
    assert_eq!(totals["egress_denied"].as_u64(), Some(denied.len() as u64), "{totals}");
    assert_eq!(totals["bytes_in"].as_u64(), Some(sum("bytes_in")), "{totals}");
    assert_eq!(totals["bytes_out"].as_u64(), Some(sum("bytes_out")), "{totals}");
    assert!(totals["dns_refused"].as_u64().unwrap_or(0) >= 1, "{totals}");
}

#[test]
fn a_published_port_serves_100_concurrent_connections_intact() {
    let (r, v) = step("publish");
    let context = format!("{}\n{}", r.stdout, r.stderr);
    let blob = v.get("blob_sha").expect("the cell's blob hash");
    assert_eq!(v.get("fetched"), Some(&format!(" 100 {blob}")), "{context}");
    // Clients that shut their sending side after the request still get the whole response.
    assert_eq!(v.get("half_closed"), Some(&format!(" 10 0/{blob}")), "{context}");
    assert!(r.stdout.contains("guest_done"), "{context}");
    let ingress = events(r).into_iter().filter(|e| e["direction"] == "ingress").collect::<Vec<_>>();
    let served = ingress.iter().filter(|e| e["verdict"] == "allowed").count();
    assert!(served >= 112, "110 fetches, the probe and the stop: {served}\n{context}");
    assert_eq!(receipt_network(r)["ingress"].as_u64(), Some(served as u64), "{context}");
}

#[test]
fn a_hostile_guest_gets_clear_denials_and_bounded_host_memory() {
    let (r, v) = step("hostile-network");
    let context = format!("{}\n{}", r.stdout, r.stderr);
    assert_eq!(v.get("malformed_denied").map(String::as_str), Some("300"), "{context}");
    assert_eq!(v.get("flood_failed").map(String::as_str), Some("1000"), "{context}");
    // 250 streams asked at once: the host's egress budget (network::MAX_EGRESS, 120) was
    // relayed, every other one refused for that reason, and so was the next one.
    let count = |k: &str| v.get(k).and_then(|n| n.parse::<usize>().ok()).unwrap_or(0);
    // (A few of the 250 may find the VMM's table still holding the flood's closed streams.)
    let held = count("held");
    // More than the host's budget of 120; the VMM's table may still hold some of the flood.
    assert!(held > 160, "{context}");
    assert_eq!(count("held_relayed"), 120, "{context}");
    assert_eq!(count("held_too_many"), held - 120, "{context}");
    let over = v.get("over_limit").map_or("", String::as_str);
    assert!(over.starts_with("DENIED") && over.contains("too many"), "{context}");
    let after = v.get("after_abuse").map_or("", String::as_str);
    assert!(after.starts_with("HTTP/1.") && after.ends_with(" 200 OK"), "{context}");
    assert!(v.get("other_cell").is_some_and(|o| o == "0 small-file"), "{context}");
    // ... and it was started while the attacker's cell was still running.
    assert_eq!(v.get("other_during_abuse").map(String::as_str), Some("yes"), "{context}");
    let peak: u64 = v.get("host_rss_peak_kib").and_then(|p| p.parse().ok()).unwrap_or(u64::MAX);
    assert!(peak < 256 * 1024, "the proxy's process grew to {peak} KiB\n{context}");
    let totals = receipt_network(r);
    // 300 malformed, 1000 flooded, the streams over the limit and the one asked over it.
    let counted = totals["egress_denied"].as_u64().unwrap_or(0);
    assert!(counted >= 1300, "every denial is counted: {totals}");
    // Each is an audit event, or counted in a `network_suppressed` entry past the rate.
    let logged: u64 = v.get("network_events").and_then(|n| n.parse().ok()).unwrap_or(0);
    let suppressed = totals["events_suppressed"].as_u64().unwrap_or(0);
    assert!(logged + suppressed >= counted, "{logged} + {suppressed} < {counted}: {totals}");
    assert!(suppressed == 0 || v.get("suppressed_entries").is_some_and(|n| n != "0"), "{context}");
    assert_eq!(v.get("audit").map(String::as_str), Some("ok"), "{context}");
}

#[test]
fn without_network_options_nothing_leaves_and_the_surface_says_none() {
    let (r, v) = step("no-network");
    let context = format!("{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("no network"), "resolv.conf says so: {context}");
    assert_ne!(v.get("wget").map(String::as_str), Some("0"), "{context}");
    assert_ne!(v.get("nslookup").map(String::as_str), Some("0"), "{context}");
    assert!(v.get("stored").is_some_and(|s| s.contains("none")), "{context}");
    assert!(v.get("planned").is_some_and(|s| s.contains("none")), "{context}");
    assert_eq!(v.get("diff").map(String::as_str), Some("1"), "{context}");
    assert!(r.stdout.contains("network.egress has \"payload.test:443\""), "{context}");
    assert!(r.stdout.contains("network.publish has \"127.0.0.1:8080:80\""), "{context}");
}
