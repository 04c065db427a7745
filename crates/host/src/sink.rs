//! Where a cell's output and the lifecycle's notices go: a terminal for `isocell run`, a
//! stream to a client for the daemon, a buffer in a test. The lifecycle never writes to this
//! process's stdout or stderr itself.

/// Receives a command's output as it arrives, and the lifecycle's warnings.
pub trait OutputSink: Send {
    /// Bytes the command wrote to its standard output.
    fn stdout(&mut self, bytes: &[u8]);
    /// Bytes the command wrote to its standard error.
    fn stderr(&mut self, bytes: &[u8]);
    /// A line from the lifecycle itself (a warning, why something was stopped).
    fn notice(&mut self, line: &str);
}

/// Keeps everything in memory (tests, short commands through an API).
#[derive(Debug, Default, Clone)]
pub struct Collect {
    /// Standard output so far.
    pub stdout: Vec<u8>,
    /// Standard error so far.
    pub stderr: Vec<u8>,
    /// Notices so far.
    pub notices: Vec<String>,
}

impl OutputSink for Collect {
    fn stdout(&mut self, bytes: &[u8]) {
        self.stdout.extend_from_slice(bytes);
    }
    fn stderr(&mut self, bytes: &[u8]) {
        self.stderr.extend_from_slice(bytes);
    }
    fn notice(&mut self, line: &str) {
        self.notices.push(line.to_owned());
    }
}
