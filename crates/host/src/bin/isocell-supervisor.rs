//! `isocell-supervisor SPEC.json`: owns one long-lived cell for its whole life (see
//! `isocell_host::supervisor`). Started by `isocelld`, in its own session so it outlives the
//! daemon; SIGTERM ends the cell in order.

use std::io::Write;

use isocell_host::supervisor::{supervise, StartEvent, SupervisorSpec};
use isocell_host::{Cancel, CancelReason};

fn main() {
    let mut out = std::io::stdout();
    let spec = std::env::args_os()
        .nth(1)
        .ok_or_else(|| "usage: isocell-supervisor SPEC.json".to_owned())
        .and_then(|p| std::fs::read(&p).map_err(|e| format!("{}: {e}", p.to_string_lossy())))
        .and_then(|b| {
            serde_json::from_slice::<SupervisorSpec>(&b).map_err(|e| format!("bad spec: {e}"))
        });
    let spec = match spec {
        Ok(s) => s,
        Err(message) => {
            let event = StartEvent::Failed { kind: "invalid".into(), message };
            let _ = writeln!(out, "{}", serde_json::to_string(&event).unwrap_or_default());
            std::process::exit(2);
        }
    };
    let cancel = Cancel::new();
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        let c = cancel.clone();
        // SAFETY: the handler only does one atomic compare-exchange, which is
        // async-signal-safe.
        let _ = unsafe {
            signal_hook::low_level::register(sig, move || c.cancel(CancelReason::Signal(sig)))
        };
    }
    std::process::exit(supervise(&spec, &mut out, &cancel));
}
