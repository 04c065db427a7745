//! `isocell-jailer SPEC.json`: confines one cell's VMM as the spec says and runs it, exiting
//! with the VMM's status (or its fatal signal). Status 7: the jail could not be set up.
//! Runs as root; `isocell` starts it, never a user.

use std::process::ExitCode;

use isocell_jail::{JailSpec, EXIT_JAIL_FAILED};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let [_, path] = args.as_slice() else {
        eprintln!("usage: isocell-jailer SPEC.json (isocell starts it for each cell)");
        return ExitCode::from(2);
    };
    let spec: JailSpec = match std::fs::read_to_string(path)
        .map_err(|e| e.to_string())
        .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!("isocell-jailer: cannot read the jail spec {path}: {e}");
            return ExitCode::from(EXIT_JAIL_FAILED as u8);
        }
    };
    ExitCode::from(isocell_jail::enter::run(&spec).clamp(0, 255) as u8)
}
