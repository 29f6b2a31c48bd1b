//! Which addresses the operator's own outbound calls may reach (pure). A job names URLs the
//! operator itself connects to: the webhook of `spec.notify` (from a Secret) and the S3 endpoint
//! of `spec.output.s3` (or the operator's `AWS_ENDPOINT_URL_S3`). Whoever may create a
//! TrainingJob could otherwise point them at the operator's own surroundings: the cloud metadata
//! service at 169.254.169.254 (node credentials), the API server, or any Service of the cluster.
//!
//! So, unless the operator runs with `--allow-private-endpoints`, such a URL is refused when its
//! host is, or resolves to, an address that is not public ([`address_allowed`]), or when the name
//! itself can only mean something inside the cluster or the host's network ([`name_allowed`]).
//! The Service CIDR of a cluster cannot be known from inside it (it is usually private, and then
//! the address check covers it), hence the name rules: `.svc`, `.cluster.local` (every `.local`),
//! `.internal` (GCP metadata, AWS private DNS, and the TLD ICANN reserved for private use),
//! `.localhost`, `.localdomain`, `.home.arpa`, and names of a single label, which the resolver
//! completes with the pod's search domains (`minio` becomes `minio.<namespace>.svc.cluster.local`).
//! Names are resolved as absolute names (see `endpoint`), so `minio.storage` is never completed
//! to a Service either. A cluster with a custom domain relies on the address check alone.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The flag that turns the check off, for messages.
pub const ALLOW_FLAG: &str = "--allow-private-endpoints";

/// Whether URLs named by jobs may reach non-public addresses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EndpointPolicy {
    /// Only public addresses (the operator's default).
    #[default]
    PublicOnly,
    /// Anything (`--allow-private-endpoints`; the CLI, which runs with its user's own settings).
    AllowPrivate,
}

/// Why an address or a name is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    Loopback,
    /// 169.254/16 and fe80::/10: the cloud metadata services answer there.
    LinkLocal,
    /// 10/8, 172.16/12, 192.168/16, fc00::/7 (and the deprecated site-local fec0::/10).
    Private,
    /// 100.64/10, carrier-grade NAT, used by some clusters for pods or services.
    SharedAddressSpace,
    /// 0/8 and `::`: connecting there reaches the local host.
    Unspecified,
    Multicast,
    /// 240/4, including the broadcast address.
    Reserved,
    /// A name under a suffix only the cluster or the host's network resolves.
    InternalName {
        suffix: &'static str,
    },
    /// A name of one label, completed by the resolver's search domains.
    SingleLabelName,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Loopback => f.write_str("a loopback address"),
            Refusal::LinkLocal => f.write_str("a link-local address (where cloud metadata services answer)"),
            Refusal::Private => f.write_str("a private address"),
            Refusal::SharedAddressSpace => f.write_str("a carrier-grade NAT address (100.64.0.0/10)"),
            Refusal::Unspecified => f.write_str("an unspecified address (the local host)"),
            Refusal::Multicast => f.write_str("a multicast address"),
            Refusal::Reserved => f.write_str("a reserved address"),
            Refusal::InternalName { suffix } => {
                write!(f, "a name under `.{suffix}`, which only the cluster or the host's network resolves")
            }
            Refusal::SingleLabelName => f.write_str(
                "a single-label name, which the resolver completes with the cluster's search domains",
            ),
        }
    }
}

/// Suffixes of names that only mean something inside the cluster or the host's network.
const INTERNAL_SUFFIXES: [&str; 6] = ["svc", "local", "internal", "localhost", "localdomain", "home.arpa"];

/// Whether `ip` may be connected to under `policy`. Pure.
pub fn address_allowed(ip: IpAddr, policy: EndpointPolicy) -> Result<(), Refusal> {
    if policy == EndpointPolicy::AllowPrivate {
        return Ok(());
    }
    match ip {
        IpAddr::V4(v4) => v4_allowed(v4),
        IpAddr::V6(v6) => v6_allowed(v6),
    }
}

fn v4_allowed(ip: Ipv4Addr) -> Result<(), Refusal> {
    let [a, b, ..] = ip.octets();
    match (a, b) {
        (0, _) => Err(Refusal::Unspecified),
        (127, _) => Err(Refusal::Loopback),
        (169, 254) => Err(Refusal::LinkLocal),
        (10, _) | (192, 168) => Err(Refusal::Private),
        (172, 16..=31) => Err(Refusal::Private),
        (100, 64..=127) => Err(Refusal::SharedAddressSpace),
        (224..=239, _) => Err(Refusal::Multicast),
        (240..=255, _) => Err(Refusal::Reserved),
        _ => Ok(()),
    }
}

fn v6_allowed(ip: Ipv6Addr) -> Result<(), Refusal> {
    if ip.is_unspecified() {
        return Err(Refusal::Unspecified);
    }
    if ip.is_loopback() {
        return Err(Refusal::Loopback);
    }
    // IPv6 forms that carry an IPv4 address a packet ends up at: judged by that address.
    if let Some(v4) = embedded_v4(ip) {
        return v4_allowed(v4);
    }
    let first = ip.segments()[0];
    match first {
        0xfe80..=0xfebf => Err(Refusal::LinkLocal),
        0xfc00..=0xfdff | 0xfec0..=0xfeff => Err(Refusal::Private),
        0xff00..=0xffff => Err(Refusal::Multicast),
        _ => Ok(()),
    }
}

/// The IPv4 address inside an IPv4-mapped (`::ffff:a.b.c.d`), IPv4-compatible (`::a.b.c.d`),
/// NAT64 (`64:ff9b::a.b.c.d`) or 6to4 (`2002:aabb:ccdd::`) address.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let low = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    match s {
        [0, 0, 0, 0, 0, 0xffff, ..] | [0, 0, 0, 0, 0, 0, ..] => Some(low),
        [0x64, 0xff9b, 0, 0, 0, 0, ..] => Some(low),
        [0x2002, hi, lo, ..] => Some(Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8)),
        _ => None,
    }
}

/// Whether the host name `name` (not an address literal) may be used under `policy`. Pure.
pub fn name_allowed(name: &str, policy: EndpointPolicy) -> Result<(), Refusal> {
    if policy == EndpointPolicy::AllowPrivate {
        return Ok(());
    }
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    if !name.contains('.') {
        // `localhost` itself is a single label too.
        return Err(Refusal::SingleLabelName);
    }
    for suffix in INTERNAL_SUFFIXES {
        if name == suffix || name.ends_with(&format!(".{suffix}")) {
            return Err(Refusal::InternalName { suffix });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use EndpointPolicy::*;

    fn check(ip: &str) -> Result<(), Refusal> {
        address_allowed(ip.parse().unwrap(), PublicOnly)
    }

    #[test]
    fn addresses_that_are_not_public_are_refused() {
        let table = [
            ("127.0.0.1", Err(Refusal::Loopback)),
            ("127.255.1.2", Err(Refusal::Loopback)),
            ("169.254.169.254", Err(Refusal::LinkLocal)),
            ("10.0.0.5", Err(Refusal::Private)),
            ("172.16.0.1", Err(Refusal::Private)),
            ("172.31.255.255", Err(Refusal::Private)),
            ("192.168.1.1", Err(Refusal::Private)),
            ("100.64.0.1", Err(Refusal::SharedAddressSpace)),
            ("100.127.255.254", Err(Refusal::SharedAddressSpace)),
            ("0.0.0.0", Err(Refusal::Unspecified)),
            ("0.1.2.3", Err(Refusal::Unspecified)),
            ("224.0.0.1", Err(Refusal::Multicast)),
            ("255.255.255.255", Err(Refusal::Reserved)),
            ("::1", Err(Refusal::Loopback)),
            ("::", Err(Refusal::Unspecified)),
            ("fe80::1", Err(Refusal::LinkLocal)),
            ("febf::1", Err(Refusal::LinkLocal)),
            ("fc00::1", Err(Refusal::Private)),
            ("fd12:3456::1", Err(Refusal::Private)),
            ("fec0::1", Err(Refusal::Private)),
            ("ff02::1", Err(Refusal::Multicast)),
            // IPv4 inside IPv6: judged by the IPv4 address.
            ("::ffff:10.0.0.1", Err(Refusal::Private)),
            ("::ffff:127.0.0.1", Err(Refusal::Loopback)),
            ("::ffff:169.254.169.254", Err(Refusal::LinkLocal)),
            ("::10.0.0.1", Err(Refusal::Private)),
            ("64:ff9b::a9fe:a9fe", Err(Refusal::LinkLocal)),
            ("2002:c0a8:0101::1", Err(Refusal::Private)),
        ];
        for (ip, expected) in table {
            assert_eq!(check(ip), expected, "{ip}");
        }
    }

    #[test]
    fn public_addresses_pass() {
        for ip in [
            "1.1.1.1",
            "8.8.8.8",
            "172.15.255.255",
            "172.32.0.0",
            "100.63.255.255",
            "100.128.0.0",
            "169.253.0.1",
            "192.169.0.1",
            "11.0.0.1",
            "223.255.255.255",
            "2606:4700:4700::1111",
            "2a00:1450:4001::200e",
            "::ffff:1.1.1.1",
            "64:ff9b::808:808",
            "2002:0808:0808::1",
            "fe7f::1",
            "fbff::1",
        ] {
            assert_eq!(check(ip), Ok(()), "{ip}");
        }
    }

    #[test]
    fn allowing_private_endpoints_allows_every_address_and_name() {
        for ip in ["127.0.0.1", "169.254.169.254", "10.0.0.5", "::1", "::ffff:10.0.0.1"] {
            assert_eq!(address_allowed(ip.parse().unwrap(), AllowPrivate), Ok(()), "{ip}");
        }
        for name in ["localhost", "minio", "minio.storage.svc.cluster.local"] {
            assert_eq!(name_allowed(name, AllowPrivate), Ok(()), "{name}");
        }
    }

    #[test]
    fn cluster_and_host_internal_names_are_refused() {
        let internal = |suffix| Err(Refusal::InternalName { suffix });
        let table = [
            ("localhost", Err(Refusal::SingleLabelName)),
            ("minio", Err(Refusal::SingleLabelName)),
            ("kubernetes.", Err(Refusal::SingleLabelName)),
            ("app.localhost", internal("localhost")),
            ("minio.storage.svc", internal("svc")),
            ("minio.storage.svc.cluster.local", internal("local")),
            ("MINIO.STORAGE.SVC.CLUSTER.LOCAL.", internal("local")),
            ("metadata.google.internal", internal("internal")),
            ("ip-10-0-0-5.ec2.internal", internal("internal")),
            ("nas.home.arpa", internal("home.arpa")),
            ("box.localdomain", internal("localdomain")),
        ];
        for (name, expected) in table {
            assert_eq!(name_allowed(name, PublicOnly), expected, "{name}");
        }
        for name in
            ["hooks.slack.com", "acct.r2.cloudflarestorage.com", "s3.amazonaws.com.", "svc.example.com"]
        {
            assert_eq!(name_allowed(name, PublicOnly), Ok(()), "{name}");
        }
    }

    #[test]
    fn refusals_say_what_the_address_is() {
        assert_eq!(Refusal::Private.to_string(), "a private address");
        assert!(Refusal::LinkLocal.to_string().contains("metadata"));
        assert!(Refusal::InternalName { suffix: "svc" }.to_string().contains("`.svc`"));
    }
}
