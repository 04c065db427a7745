//! Where a guest spends its time, seen from the test host (issue 15). KVM's `kvm_exit`
//! tracepoint records the guest's RIP at every VM exit. The host's timer interrupts a running
//! guest at points unrelated to what it does, so the RIPs of the `interrupt` exits are a
//! statistical profile of the guest's running time (one sample per host tick; a halted guest is
//! not running and gives none). The other exits say what the guest costs the host, by reason
//! (nested-paging faults, MSR writes, ...) and by the guest code that caused them. RIPs are
//! named from the cell kernel's symbol table; those below the kernel's half are user space.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use object::{Object, ObjectSection, ObjectSymbol, SectionKind, SymbolKind};
use serde_json::{json, Value};

use crate::{Step, StepResult};

/// Traces the command given as its arguments (killed after 240 s, before the step's own
/// limit, so the trace is always taken down) in a trace instance of its own, which touches no
/// global trace setting and goes when done. Prints the exits by reason (`R REASON COUNT`), the
/// 1,500 most frequent (reason, guest RIP) pairs (`X REASON RIP COUNT`; user-space RIPs folded
/// into `0x0`), the events the ring buffer lost (`LOST N`), then `RC STATUS`. Prints
/// `UNAVAILABLE WHY` instead where the host has no tracefs with the `kvm_exit` event.
const TRACE_SCRIPT: &str = r#"T=/sys/kernel/tracing
[ -d "$T/instances" ] || mount -t tracefs nodev "$T" 2>/dev/null
for old in "$T"/instances/isocell-profile-*; do [ -d "$old" ] && rmdir "$old" 2>/dev/null; done
I="$T/instances/isocell-profile-$$"
if ! mkdir "$I" 2>/dev/null || [ ! -w "$I/events/kvm/kvm_exit/enable" ]; then
  [ -d "$I" ] && rmdir "$I"
  echo "UNAVAILABLE no tracefs instance with the kvm_exit event under $T"; exit 0
fi
echo 16384 > "$I/buffer_size_kb"
echo 1 > "$I/events/kvm/kvm_exit/enable"
timeout -s KILL 240 "$@" > /dev/null 2>&1
rc=$?
echo 0 > "$I/events/kvm/kvm_exit/enable"
awk '/kvm_exit:/ { r = ""; rip = ""
  for (i = 1; i < NF; i++) { if ($i == "reason") r = $(i + 1); if ($i == "rip") rip = $(i + 1) }
  if (r == "" || rip == "") next
  if (substr(rip, 1, 6) != "0xffff") rip = "0x0"
  n[r " " rip]++; by[r]++ }
  END { for (k in by) print "R", k, by[k]; for (k in n) print "X", k, n[k] }' "$I/trace"   | sort -k1,1 -k4,4nr | awk '$1 == "R" || ++x <= 1500'
cat "$I"/per_cpu/cpu*/stats 2>/dev/null | awk '$1 == "overrun:" { n += $2 } END { print "LOST", n + 0 }'
rmdir "$I"
echo "RC $rc"
"#;

/// The profile step's limit; the script kills the traced command at 240 s, before it.
const STEP_TIMEOUT_SECS: u64 = 300;

/// The step `profile-NAME`: runs `script` (a shell command line, placeholders allowed) under the
/// trace. Its result is read by [`report`].
pub fn step(name: &str, script: &str) -> Step {
    let argv = ["sh", "-c", TRACE_SCRIPT, "profile", "sh", "-c", script];
    Step::new(format!("profile-{name}"), &argv, STEP_TIMEOUT_SECS)
}

/// The text symbols of an ELF file, by start address.
pub struct Symbols(Vec<(u64, String)>);

impl Symbols {
    /// Reads the symbol table of `path` (the cell kernel's vmlinux).
    pub fn of_elf(path: &Path) -> Result<Symbols, String> {
        let data =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let file = object::File::parse(&*data)
            .map_err(|e| format!("{} is not an ELF file: {e}", path.display()))?;
        // Functions, and the untyped symbols of the assembly in text sections (the entry code
        // has no function symbols: its RIPs would count against the last C function before it).
        let in_text = |s: &object::Symbol<'_, '_>| {
            s.section_index()
                .and_then(|i| file.section_by_index(i).ok())
                .is_some_and(|section| section.kind() == SectionKind::Text)
        };
        // At one address a function sorts after a marker (`__foo_text_start`): it is the one
        // `name` finds.
        let mut symbols: Vec<(u64, bool, String)> = file
            .symbols()
            .filter(|s| s.address() != 0)
            .filter(|s| {
                s.kind() == SymbolKind::Text
                    || (matches!(s.kind(), SymbolKind::Label | SymbolKind::Unknown) && in_text(s))
            })
            .filter_map(|s| {
                Some((s.address(), s.kind() == SymbolKind::Text, s.name().ok()?.to_owned()))
            })
            .collect();
        symbols.sort();
        Ok(Symbols(symbols.into_iter().map(|(a, _, n)| (a, n)).collect()))
    }

    /// The function `rip` is in: the nearest symbol at or below it.
    fn name(&self, rip: u64) -> &str {
        if rip < 0xffff_8000_0000_0000 {
            return "(user space)";
        }
        match self.0.partition_point(|(a, _)| *a <= rip) {
            0 => "(unknown)",
            i => &self.0[i - 1].1,
        }
    }
}

/// The exits of one traced command: totals by reason, and by reason and guest function.
#[derive(Default)]
struct Profile {
    by_reason: BTreeMap<String, u64>,
    /// The most frequent (reason, RIP) pairs, by reason and function.
    by_function: BTreeMap<String, BTreeMap<String, u64>>,
    /// Events the trace's ring buffer dropped.
    lost: u64,
}

/// One name for an exit reason on AMD (SVM) and Intel (VMX) hosts: a host-timer interrupt, and a
/// nested-paging fault (or MMIO access).
fn reason_name(reason: &str) -> &str {
    match reason {
        "EXTERNAL_INTERRUPT" => "interrupt",
        "EPT_VIOLATION" | "EPT_MISCONFIG" => "npf",
        other => other,
    }
}

impl Profile {
    fn parse(stdout: &str, symbols: &Symbols) -> Result<Profile, String> {
        let mut p = Profile::default();
        let mut rc = None;
        let unreadable = |line: &str| format!("unreadable trace summary line {line:?}");
        for line in stdout.lines() {
            if let Some(why) = line.trim_start().strip_prefix("UNAVAILABLE") {
                return Err(why.trim().to_owned());
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields.as_slice() {
                ["RC", status] => rc = Some(*status),
                ["LOST", n] => p.lost = n.parse().map_err(|_| unreadable(line))?,
                ["R", reason, count] => {
                    let count: u64 = count.parse().map_err(|_| unreadable(line))?;
                    let total = p.by_reason.entry(reason_name(reason).to_owned()).or_default();
                    *total = total.saturating_add(count);
                }
                ["X", reason, rip, count] => {
                    let rip = u64::from_str_radix(rip.trim_start_matches("0x"), 16);
                    let (Ok(rip), Ok(count)) = (rip, count.parse::<u64>()) else {
                        return Err(unreadable(line));
                    };
                    let functions =
                        p.by_function.entry(reason_name(reason).to_owned()).or_default();
                    let n = functions.entry(symbols.name(rip).to_owned()).or_default();
                    *n = n.saturating_add(count);
                }
                _ => {}
            }
        }
        match rc {
            None => return Err("the trace summary is incomplete (no exit status)".into()),
            Some("0") => {}
            Some(status) => {
                return Err(format!("the traced command failed (exit status {status})"))
            }
        }
        if p.by_reason.is_empty() {
            return Err("the trace held no exits".into());
        }
        Ok(p)
    }

    /// The `n` functions with the most exits for `reason`, most first.
    fn top(&self, reason: &str, n: usize) -> Vec<(&str, u64)> {
        let mut v: Vec<(&str, u64)> = self
            .by_function
            .get(reason)
            .map(|m| m.iter().map(|(f, c)| (f.as_str(), *c)).collect())
            .unwrap_or_default();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        v.truncate(n);
        v
    }

    fn samples(&self) -> u64 {
        self.by_reason.get("interrupt").copied().unwrap_or(0)
    }

    /// `count` samples as a percentage of all of them.
    fn share(&self, count: u64) -> f64 {
        100.0 * count as f64 / self.samples().max(1) as f64
    }

    fn text(&self, what: &str) -> String {
        let mut out = format!("guest profile: {what}\n\nexits by reason:\n");
        let mut reasons: Vec<_> = self.by_reason.iter().collect();
        reasons.sort_by(|a, b| b.1.cmp(a.1));
        for (reason, count) in reasons {
            let _ = writeln!(out, "  {count:>7}  {reason}");
        }
        if self.lost > 0 {
            let _ = writeln!(out, "  (the trace lost {} events: the counts are short)", self.lost);
        }
        let _ = writeln!(
            out,
            "\nwhere the guest runs ({} host-timer samples, `interrupt` exits; shares of the \
             guest's running time, not of wall time):",
            self.samples()
        );
        for (f, c) in self.top("interrupt", 30) {
            let _ = writeln!(out, "  {c:>6} {:>5.1}%  {f}", self.share(c));
        }
        for (reason, total) in self.by_reason.iter().filter(|(r, _)| *r != "interrupt") {
            let _ = writeln!(out, "\n{reason} exits, by the guest code that caused them:");
            for (f, c) in self.top(reason, 15) {
                let _ = writeln!(out, "  {c:>6}  {f}");
            }
            let listed: u64 = self.by_function.get(reason).map_or(0, |m| m.values().sum());
            if listed < *total {
                let _ = writeln!(out, "  {:>6}  (rarer guest RIPs, not listed)", total - listed);
            }
        }
        out
    }

    fn json(&self) -> Value {
        let top = |reason: &str, n| -> Vec<Value> {
            self.top(reason, n).iter().map(|(f, c)| json!({ "function": f, "exits": c })).collect()
        };
        json!({
            "exits_by_reason": self.by_reason,
            "samples": self.samples(),
            "top_sampled": top("interrupt", 30),
            "top_npf": top("npf", 15),
            "lost_events": self.lost,
        })
    }
}

/// The profile of step `profile-NAME` in `results`, or why there is none.
fn profile_of(results: &[StepResult], name: &str, symbols: &Symbols) -> Result<Profile, String> {
    let step = format!("profile-{name}");
    let r = results.iter().find(|r| r.name == step).ok_or("not run")?;
    match (r.timed_out, &r.error, r.exit_code) {
        (true, _, _) => Err(format!("the step ran past its {STEP_TIMEOUT_SECS} s")),
        (_, Some(e), _) => Err(e.clone()),
        (_, None, Some(0)) => Profile::parse(&r.stdout, symbols),
        (_, None, code) => Err(format!("the trace script failed ({code:?}): {}", r.stderr.trim())),
    }
}

/// Reads the profile step `name` from `results`, writes `guest-profile-NAME.txt` into `dir`,
/// prints its head and returns its JSON (or why there is none).
pub fn report(
    results: &[StepResult],
    name: &str,
    what: &str,
    symbols: &Symbols,
    dir: &Path,
) -> Value {
    let profile = match profile_of(results, name, symbols) {
        Ok(p) => p,
        Err(why) => {
            println!("  guest profile ({what}): none: {why}");
            return json!({ "unavailable": why });
        }
    };
    let path = dir.join(format!("guest-profile-{name}.txt"));
    let text = profile.text(what);
    if let Err(e) = std::fs::write(&path, &text) {
        println!("  guest profile ({what}): cannot write {}: {e}", path.display());
    }
    let head: Vec<String> = profile
        .top("interrupt", 5)
        .iter()
        .map(|(f, c)| format!("{f} {:.0}%", profile.share(*c)))
        .collect();
    println!("  guest profile ({what}): {} samples; most: {}", profile.samples(), head.join(", "));
    let npf = profile.by_reason.get("npf").copied().unwrap_or(0);
    println!("    {npf} nested-paging exits; all of it in {}", path.display());
    profile.json()
}

/// What an idle cell costs its host: exits per second while the command in it only sleeps,
/// from two profile steps that differ only in how long it sleeps (`short` and `long`: step name,
/// seconds). Boot, start and teardown cost the same in both, so the difference is the idle
/// time's; by reason and in total. Prints one line and returns its JSON (or why there is none).
pub fn idle_rate(results: &[StepResult], short: (&str, u64), long: (&str, u64)) -> Value {
    // Totals by reason need no symbols.
    let totals = |name| profile_of(results, name, &Symbols(Vec::new())).map(|p| p.by_reason);
    match (totals(short.0), totals(long.0)) {
        (Ok(a), Ok(b)) => {
            let rates = idle_rates(&a, &b, long.1.saturating_sub(short.1));
            let total: f64 = rates.values().sum();
            let mut by: Vec<(&String, &f64)> = rates.iter().filter(|(_, r)| **r >= 0.5).collect();
            by.sort_by(|x, y| y.1.total_cmp(x.1));
            let by: Vec<String> = by.iter().map(|(k, v)| format!("{k} {v:.0}")).collect();
            println!("  idle cell: {total:.0} exits/s ({})", by.join(", "));
            json!({ "exits_per_second": total, "by_reason": rates })
        }
        (Err(why), _) | (_, Err(why)) => {
            println!("  idle cell: none: {why}");
            json!({ "unavailable": why })
        }
    }
}

/// Exits per second, by reason, of the `secs` more seconds idle that `long` had over `short`
/// (never below zero: a reason rarer in the longer run had nothing to do with idling).
fn idle_rates(
    short: &BTreeMap<String, u64>,
    long: &BTreeMap<String, u64>,
    secs: u64,
) -> BTreeMap<String, f64> {
    let secs = secs.max(1) as f64;
    long.iter()
        .map(|(reason, n)| {
            let extra = n.saturating_sub(short.get(reason).copied().unwrap_or(0));
            (reason.clone(), extra as f64 / secs)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn symbols() -> Symbols {
        Symbols(vec![(0xffff_ffff_8100_0000, "a".into()), (0xffff_ffff_8100_0100, "b".into())])
    }

    #[test]
    fn the_idle_rate_is_the_difference_per_extra_second() {
        let counts = |v: &[(&str, u64)]| -> BTreeMap<String, u64> {
            v.iter().map(|(k, n)| ((*k).to_owned(), *n)).collect()
        };
        let short = counts(&[("npf", 1500), ("msr", 40), ("hlt", 3)]);
        let long = counts(&[("npf", 1490), ("msr", 790), ("hlt", 753), ("interrupt", 30)]);
        let r = idle_rates(&short, &long, 3);
        assert_eq!(r["msr"], 250.0);
        assert_eq!(r["hlt"], 250.0);
        assert_eq!(r["interrupt"], 10.0);
        assert_eq!(r["npf"], 0.0, "fewer in the longer run counts as none");
        assert_eq!(idle_rates(&short, &long, 0)["msr"], 750.0, "no division by zero");
    }

    #[test]
    fn rips_are_named_by_the_nearest_symbol_below_and_user_space_apart() {
        let s = symbols();
        assert_eq!(s.name(0xffff_ffff_8100_0000), "a");
        assert_eq!(s.name(0xffff_ffff_8100_00ff), "a");
        assert_eq!(s.name(0xffff_ffff_8100_0100), "b");
        assert_eq!(s.name(0xffff_ffff_80ff_ffff), "(unknown)");
        assert_eq!(s.name(0x40_1000), "(user space)");
    }

    #[test]
    fn the_trace_summary_is_counted_by_reason_and_function() {
        let out = "R interrupt 4\nR npf 9\nX interrupt 0xffffffff81000010 3\n\
                   X interrupt 0xffffffff81000100 1\nX npf 0x0 5\nX npf 0xffffffff81000001 2\n\
                   LOST 0\nRC 0\n";
        let p = Profile::parse(out, &symbols()).unwrap();
        assert_eq!(p.samples(), 4);
        assert_eq!(p.by_reason["npf"], 9);
        assert_eq!(p.top("interrupt", 1), vec![("a", 3)]);
        assert_eq!(p.top("npf", 5), vec![("(user space)", 5), ("a", 2)]);
        let text = p.text("t");
        assert!(text.contains("75.0%  a"), "{text}");
        assert!(text.contains("2  (rarer guest RIPs"), "{text}");
        assert!(!text.contains("lost"), "{text}");
    }

    #[test]
    fn intel_exit_reasons_count_as_the_amd_ones() {
        let out = "R EXTERNAL_INTERRUPT 2\nR EPT_VIOLATION 1\nR EPT_MISCONFIG 1\n\
                   X EXTERNAL_INTERRUPT 0xffffffff81000100 2\nLOST 3\nRC 0\n";
        let p = Profile::parse(out, &symbols()).unwrap();
        assert_eq!(p.samples(), 2);
        assert_eq!(p.by_reason["npf"], 2);
        assert_eq!(p.top("interrupt", 1), vec![("b", 2)]);
        assert!(p.text("t").contains("lost 3 events"));
    }

    #[test]
    fn a_host_without_the_tracepoint_or_a_failed_command_gives_no_profile() {
        let s = symbols();
        let err = Profile::parse("UNAVAILABLE no tracefs\n", &s).err().unwrap();
        assert_eq!(err, "no tracefs");
        assert_eq!(Profile::parse("UNAVAILABLE\n", &s).err().unwrap(), "");
        assert!(Profile::parse("UNAVAILABLE\u{a0}x\n", &s).is_err());
        let failed = Profile::parse("R npf 1\nRC 137\n", &s).err().unwrap();
        assert!(failed.contains("failed (exit status 137)"), "{failed}");
        assert!(Profile::parse("RC 0\n", &s).err().unwrap().contains("no exits"));
        assert!(Profile::parse("R npf 1\n", &s).err().unwrap().contains("incomplete"));
        assert!(Profile::parse("X npf zz 1\nRC 0\n", &s).err().unwrap().contains("unreadable"));
        assert!(Profile::parse("R npf -1\nRC 0\n", &s).err().unwrap().contains("unreadable"));
    }
}
