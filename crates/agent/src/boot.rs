//! What the kernel command line tells the agent. The kernel hands init only undotted unknown
//! parameters (as environment variables), so the agent reads `/proc/cmdline` itself:
//!
//! | parameter | meaning |
//! |---|---|
//! | `isocell.root=DEVICE` | the agent runs from an initramfs; the image is `DEVICE` (read-only) |
//! | `isocell.rootfstype=TYPE` | its filesystem (default `ext4`) |
//! | `isocell.hostname=NAME` | the cell's host name (default `cell`) |
//! | `isocell.net=LIST` | the cell's network, a comma list of `egress` and `ingress` (default none) |
//!
//! Without `isocell.root=`, the kernel has mounted the image as the root and the agent is its
//! `/sbin/init` (images built before the initramfs existed).

/// The host name of a cell that is given none (or an invalid one).
pub const DEFAULT_HOSTNAME: &str = "cell";
/// The image's filesystem type when none is given.
pub const DEFAULT_ROOT_FSTYPE: &str = "ext4";

/// The parts of the network a cell has (see `isocell_proto::net`); none by default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Net {
    /// Outgoing TCP connections and DNS, through the host.
    pub egress: bool,
    /// Published ports: the host's connections to the cell's loopback.
    pub ingress: bool,
}

/// The agent's boot parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootArgs {
    /// The device holding the cell image, when the agent must mount it itself.
    pub root: Option<String>,
    /// The image's filesystem type.
    pub root_fstype: String,
    /// The cell's host name (validated).
    pub hostname: String,
    /// Which parts of the network the cell has.
    pub net: Net,
    /// Problems with the parameters, for the console; none is fatal.
    pub warnings: Vec<String>,
}

impl BootArgs {
    /// Reads the parameters from a kernel command line. Like the kernel, the last occurrence of
    /// a parameter wins and nothing after `--` (init's own arguments) counts.
    pub fn parse(cmdline: &str) -> BootArgs {
        let mut args = BootArgs {
            root: None,
            root_fstype: DEFAULT_ROOT_FSTYPE.to_owned(),
            hostname: DEFAULT_HOSTNAME.to_owned(),
            net: Net::default(),
            warnings: Vec::new(),
        };
        for word in split(cmdline) {
            if word == "--" {
                break;
            }
            let Some((key, value)) = word.split_once('=') else { continue };
            match key {
                // Checked where it is used ([`valid_device`]): a bad one is still initramfs
                // mode, and failing to mount beats booting something else.
                "isocell.root" => args.root = Some(value.to_owned()),
                "isocell.rootfstype" => {
                    if !value.is_empty()
                        && value.len() <= 32
                        && value.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                    {
                        args.root_fstype = value.to_owned();
                    } else {
                        args.warnings.push(format!(
                            "ignoring isocell.rootfstype={value:?}; using {DEFAULT_ROOT_FSTYPE}"
                        ));
                    }
                }
                "isocell.hostname" => {
                    if valid_hostname(value) {
                        value.clone_into(&mut args.hostname);
                    } else {
                        args.warnings.push(format!(
                            "ignoring isocell.hostname={value:?} (letters, digits, '-' and '.', \
                             at most 63); using {DEFAULT_HOSTNAME}"
                        ));
                        DEFAULT_HOSTNAME.clone_into(&mut args.hostname);
                    }
                }
                "isocell.net" => {
                    args.net = Net::default();
                    for part in value.split(',').filter(|p| !p.is_empty()) {
                        match part {
                            "egress" => args.net.egress = true,
                            "ingress" => args.net.ingress = true,
                            other => args.warnings.push(format!(
                                "ignoring {other:?} in isocell.net= (egress, ingress)"
                            )),
                        }
                    }
                }
                _ => {}
            }
        }
        args
    }
}

/// Splits a command line into parameters the way the kernel does: on spaces outside double
/// quotes, with the quotes removed.
fn split(cmdline: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_ascii_whitespace() && !quoted => {
                if any {
                    words.push(std::mem::take(&mut word));
                    any = false;
                }
            }
            c => {
                word.push(c);
                any = true;
            }
        }
    }
    if any {
        words.push(word);
    }
    words
}

/// A device path the agent will wait for: under /dev, no `..`, printable.
pub fn valid_device(path: &str) -> bool {
    path.len() <= 128
        && path.starts_with("/dev/")
        && path.len() > 5
        && !path.split('/').any(|c| c == "..")
        && path.bytes().all(|b| b.is_ascii_graphic())
}

/// A host name: 1 to 63 bytes of dot-separated labels, each of letters, digits and `-`, not
/// starting or ending with `-`.
pub fn valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_isocell_root_the_kernel_mounted_the_image() {
        let a = BootArgs::parse("console=ttyS0 root=/dev/vda ro quiet\n");
        assert_eq!(a.root, None);
        assert_eq!(a.root_fstype, "ext4");
        assert_eq!(a.hostname, "cell");
        assert_eq!(a.net, Net::default());
        assert!(a.warnings.is_empty());
    }

    #[test]
    fn network_parts_are_a_comma_list_and_the_last_parameter_wins() {
        let a = BootArgs::parse("isocell.net=egress,ingress");
        assert_eq!(a.net, Net { egress: true, ingress: true });
        assert!(a.warnings.is_empty());
        let a = BootArgs::parse("isocell.net=egress,ingress isocell.net=ingress");
        assert_eq!(a.net, Net { egress: false, ingress: true });
        let a = BootArgs::parse("isocell.net= isocell.net=,egress,");
        assert_eq!(a.net, Net { egress: true, ingress: false });
        assert!(a.warnings.is_empty());
        let a = BootArgs::parse("isocell.net=egress,udp,EGRESS");
        assert_eq!(a.net, Net { egress: true, ingress: false });
        assert_eq!(a.warnings.len(), 2, "{:?}", a.warnings);
        let a = BootArgs::parse("isocell.net");
        assert_eq!(a.net, Net::default());
    }

    #[test]
    fn isocell_parameters_are_read_and_the_last_wins() {
        let a = BootArgs::parse(
            "quiet isocell.root=/dev/vda isocell.hostname=web-1 isocell.root=/dev/dm-0 \
             isocell.rootfstype=erofs\n",
        );
        assert_eq!(a.root.as_deref(), Some("/dev/dm-0"));
        assert_eq!(a.root_fstype, "erofs");
        assert_eq!(a.hostname, "web-1");
    }

    #[test]
    fn quoted_values_with_spaces_do_not_split() {
        let a = BootArgs::parse(
            "dm-mod.create=\"vroot,,,ro,0 8 verity 1 /dev/vda /dev/vda isocell.root=/dev/x\" \
             isocell.root=/dev/dm-0",
        );
        assert_eq!(a.root.as_deref(), Some("/dev/dm-0"));
        assert_eq!(split("a=\"b c\" \"d=e f\"  g"), ["a=b c", "d=e f", "g"]);
    }

    #[test]
    fn init_arguments_after_the_separator_do_not_count() {
        let a = BootArgs::parse("quiet -- isocell.root=/dev/vda");
        assert_eq!(a.root, None);
    }

    #[test]
    fn bad_host_names_fall_back_to_the_default() {
        for bad in ["", "-a", "a-", "a..b", "a_b", "a b", &"x".repeat(64), "é"] {
            assert!(!valid_hostname(bad), "{bad:?}");
        }
        for good in ["cell", "a", "web-1", "a.b.c", &"x".repeat(63)] {
            assert!(valid_hostname(good), "{good:?}");
        }
        let a = BootArgs::parse("isocell.hostname=bad_name");
        assert_eq!(a.hostname, "cell");
        assert_eq!(a.warnings.len(), 1);
    }

    #[test]
    fn odd_devices_and_types_are_reported() {
        let a = BootArgs::parse("isocell.root=vda isocell.rootfstype=ext4,x");
        assert_eq!(a.root.as_deref(), Some("vda"));
        assert_eq!(a.root_fstype, "ext4");
        assert_eq!(a.warnings.len(), 1);
        assert!(!valid_device("vda"));
        assert!(!valid_device("/dev/../etc/x"));
        assert!(valid_device("/dev/disk/by-label/root"));
    }
}
