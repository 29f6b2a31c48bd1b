//! Applying the address policy of `address` to URLs the operator connects to: the host is an
//! address literal, or a name that is resolved and whose every address is checked. Names are
//! resolved as absolute names (a trailing dot), so the pod's search domains never turn a public
//! looking name into a cluster Service.
//!
//! The check must hold for the connection itself, not only for an earlier lookup (a DNS answer can
//! change in between): the webhook client connects to exactly the addresses checked here
//! ([`Checked::Resolved`], pinned in reqwest); the S3 client resolves through [`GuardedResolver`],
//! which checks every answer it hands to the SDK's connector, for the endpoint's host and for the
//! virtual-hosted `bucket.host` names alike. Address literals never reach a resolver, so they are
//! checked here, before a client is made.
//!
//! Messages show a URL only as `scheme://host[:port]`: webhook URLs carry tokens in their path or
//! query, and any URL may carry a user and password.

use std::future::Future;
use std::net::IpAddr;
use std::time::Duration;

use aws_smithy_runtime_api::client::dns::{DnsFuture, ResolveDns, ResolveDnsError};
use url::{Host, Url};

use super::address::{EndpointPolicy, Refusal, address_allowed, name_allowed};

/// How long one name may take to resolve.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// A URL the policy refuses, or whose host could not be checked.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error(
        "{what} ({shown}) points at {address}, {refusal}; start the operator with --allow-private-endpoints to allow it"
    )]
    Address { what: String, shown: String, address: IpAddr, refusal: Refusal },
    #[error(
        "{what} ({shown}) names {refusal}; start the operator with --allow-private-endpoints to allow it"
    )]
    Name { what: String, shown: String, refusal: Refusal },
    #[error("{what} ({shown}): cannot resolve its host: {message}")]
    Unresolved { what: String, shown: String, message: String },
    #[error("{what} has no host")]
    NoHost { what: String },
}

impl EndpointError {
    /// The policy refused it (as opposed to a name that did not resolve).
    pub fn is_refusal(&self) -> bool {
        matches!(self, EndpointError::Address { .. } | EndpointError::Name { .. })
    }
}

/// A URL as messages show it: `scheme://host[:port]`, without user, password, path or query.
pub fn origin(url: &Url) -> String {
    // `host_str` puts an IPv6 address in brackets, as a URL does.
    let host = url.host_str().unwrap_or("?");
    match url.port() {
        Some(port) => format!("{}://{host}:{port}", url.scheme()),
        None => format!("{}://{host}", url.scheme()),
    }
}

/// What checking a URL found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Checked {
    /// Nothing checked ([`EndpointPolicy::AllowPrivate`]): connect as usual.
    Unchecked,
    /// An address literal that passed.
    Literal(IpAddr),
    /// A name whose every address passed: connect to exactly these.
    Resolved(Vec<IpAddr>),
}

/// Checks `url` under `policy`, resolving its host. `what` names where the URL came from (a
/// field, or a Secret and key) for the message.
pub async fn check_url(url: &Url, policy: EndpointPolicy, what: &str) -> Result<Checked, EndpointError> {
    check_url_with(url, policy, what, system_lookup).await
}

async fn check_url_with<F, Fut>(
    url: &Url,
    policy: EndpointPolicy,
    what: &str,
    lookup: F,
) -> Result<Checked, EndpointError>
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = std::io::Result<Vec<IpAddr>>>,
{
    if policy == EndpointPolicy::AllowPrivate {
        return Ok(Checked::Unchecked);
    }
    let shown = origin(url);
    let address = |address: IpAddr| {
        address_allowed(address, policy).map_err(|refusal| EndpointError::Address {
            what: what.to_string(),
            shown: shown.clone(),
            address,
            refusal,
        })
    };
    match url.host() {
        None => Err(EndpointError::NoHost { what: what.to_string() }),
        Some(Host::Ipv4(ip)) => address(ip.into()).map(|()| Checked::Literal(ip.into())),
        Some(Host::Ipv6(ip)) => address(ip.into()).map(|()| Checked::Literal(ip.into())),
        Some(Host::Domain(name)) => {
            let addresses = lookup_checked(name, policy, what, &shown, lookup).await?;
            Ok(Checked::Resolved(addresses))
        }
    }
}

/// Resolves `name` and checks the name and every address (with `PublicOnly`; with
/// `AllowPrivate` it only resolves, search domains included, as any client would).
async fn lookup_checked<F, Fut>(
    name: &str,
    policy: EndpointPolicy,
    what: &str,
    shown: &str,
    lookup: F,
) -> Result<Vec<IpAddr>, EndpointError>
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = std::io::Result<Vec<IpAddr>>>,
{
    let unresolved = |message: String| EndpointError::Unresolved {
        what: what.to_string(),
        shown: shown.to_string(),
        message,
    };
    let query = match policy {
        EndpointPolicy::AllowPrivate => name.to_string(),
        EndpointPolicy::PublicOnly => {
            name_allowed(name, policy).map_err(|refusal| EndpointError::Name {
                what: what.to_string(),
                shown: shown.to_string(),
                refusal,
            })?;
            absolute(name)
        }
    };
    let addresses = match tokio::time::timeout(LOOKUP_TIMEOUT, lookup(query)).await {
        Ok(Ok(addresses)) if !addresses.is_empty() => addresses,
        Ok(Ok(_)) => return Err(unresolved("no address".into())),
        Ok(Err(e)) => return Err(unresolved(e.to_string())),
        Err(_) => return Err(unresolved(format!("no answer within {} s", LOOKUP_TIMEOUT.as_secs()))),
    };
    for &address in &addresses {
        address_allowed(address, policy).map_err(|refusal| EndpointError::Address {
            what: what.to_string(),
            shown: shown.to_string(),
            address,
            refusal,
        })?;
    }
    Ok(addresses)
}

/// `name.`: an absolute name, which the resolver looks up as it is.
fn absolute(name: &str) -> String {
    if name.ends_with('.') { name.to_string() } else { format!("{name}.") }
}

async fn system_lookup(name: String) -> std::io::Result<Vec<IpAddr>> {
    Ok(tokio::net::lookup_host((name.as_str(), 0)).await?.map(|a| a.ip()).collect())
}

/// The S3 client's DNS resolver: every answer is checked against the policy before the SDK's
/// connector may use it, so what was checked is what is connected to.
#[derive(Clone, Debug)]
pub struct GuardedResolver {
    policy: EndpointPolicy,
}

impl GuardedResolver {
    pub fn new(policy: EndpointPolicy) -> Self {
        Self { policy }
    }
}

impl ResolveDns for GuardedResolver {
    fn resolve_dns<'a>(&'a self, name: &'a str) -> DnsFuture<'a> {
        DnsFuture::new(async move {
            lookup_checked(name, self.policy, "the S3 endpoint", name, system_lookup)
                .await
                .map_err(ResolveDnsError::new)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use EndpointPolicy::*;

    const WHAT: &str = "the webhook URL in Secret ml/hook key `url`";

    fn answers(
        list: &'static [&'static str],
    ) -> impl FnOnce(String) -> std::future::Ready<std::io::Result<Vec<IpAddr>>> {
        move |_| std::future::ready(Ok(list.iter().map(|a| a.parse().unwrap()).collect()))
    }

    async fn check(
        url: &str,
        lookup: impl FnOnce(String) -> std::future::Ready<std::io::Result<Vec<IpAddr>>>,
    ) -> Result<Checked, EndpointError> {
        check_url_with(&Url::parse(url).unwrap(), PublicOnly, WHAT, lookup).await
    }

    #[tokio::test]
    async fn every_resolved_address_is_checked() {
        let url = "https://hooks.example.com/services/T0/B0/secret-token?sig=abc";
        let ok = check(url, answers(&["93.184.216.34", "2606:2800:220:1::1"])).await.unwrap();
        assert_eq!(
            ok,
            Checked::Resolved(vec!["93.184.216.34".parse().unwrap(), "2606:2800:220:1::1".parse().unwrap()])
        );
        // One private answer among public ones is enough to refuse.
        let err = check(url, answers(&["93.184.216.34", "10.0.0.5"])).await.unwrap_err();
        assert!(err.is_refusal());
        assert_eq!(
            err.to_string(),
            "the webhook URL in Secret ml/hook key `url` (https://hooks.example.com) points at 10.0.0.5, \
             a private address; start the operator with --allow-private-endpoints to allow it"
        );
        let err = check(url, answers(&["::ffff:169.254.169.254"])).await.unwrap_err().to_string();
        assert!(
            err.contains("link-local") && !err.contains("secret-token") && !err.contains("sig="),
            "{err}"
        );
    }

    #[tokio::test]
    async fn names_are_looked_up_as_absolute_names() {
        let seen = std::sync::Mutex::new(String::new());
        let lookup = |name: String| {
            *seen.lock().unwrap() = name;
            std::future::ready(Ok(vec![IpAddr::V4(Ipv4Addr::new(1, 1, 1, 1))]))
        };
        check_url_with(&Url::parse("https://s3.example.com/").unwrap(), PublicOnly, WHAT, lookup)
            .await
            .unwrap();
        assert_eq!(*seen.lock().unwrap(), "s3.example.com.");
    }

    #[tokio::test]
    async fn literals_and_internal_names_are_refused_without_a_lookup() {
        let never =
            |_: String| -> std::future::Ready<std::io::Result<Vec<IpAddr>>> { panic!("no lookup expected") };
        let err = check("http://user:pw@127.0.0.1:3900/bucket", never).await.unwrap_err().to_string();
        assert!(err.contains("(http://127.0.0.1:3900) points at 127.0.0.1, a loopback address"), "{err}");
        assert!(!err.contains("pw"), "{err}");
        let err = check("http://[::ffff:10.0.0.1]/x", never).await.unwrap_err().to_string();
        assert!(
            err.contains("(http://[::ffff:a00:1]) points at ::ffff:10.0.0.1, a private address"),
            "{err}"
        );
        let err = check("http://minio.storage.svc.cluster.local:9000/", never).await.unwrap_err();
        assert!(err.is_refusal() && err.to_string().contains("`.local`"), "{err}");
        let err = check("http://minio:9000/", never).await.unwrap_err().to_string();
        assert!(err.contains("single-label"), "{err}");
        assert_eq!(
            check("http://8.8.8.8/", never).await.unwrap(),
            Checked::Literal("8.8.8.8".parse().unwrap())
        );
    }

    #[tokio::test]
    async fn allowing_private_endpoints_checks_nothing() {
        let never =
            |_: String| -> std::future::Ready<std::io::Result<Vec<IpAddr>>> { panic!("no lookup expected") };
        let url = Url::parse("http://127.0.0.1:3900/").unwrap();
        assert_eq!(check_url_with(&url, AllowPrivate, WHAT, never).await.unwrap(), Checked::Unchecked);
    }

    #[tokio::test]
    async fn a_name_that_does_not_resolve_is_not_a_refusal() {
        let failing = |_: String| {
            std::future::ready(Err(std::io::Error::other("failed to lookup address information")))
        };
        let err = check("https://nxdomain.example/", failing).await.unwrap_err();
        assert!(!err.is_refusal(), "{err}");
        assert!(matches!(
            check("https://empty.example/", answers(&[])).await,
            Err(EndpointError::Unresolved { .. })
        ));
    }

    #[tokio::test]
    async fn the_s3_resolver_refuses_what_the_policy_refuses() {
        let resolver = GuardedResolver::new(PublicOnly);
        let err = resolver.resolve_dns("localhost").await.unwrap_err();
        let chain = crate::error::error_chain(&err);
        assert!(chain.contains("single-label") && chain.contains("--allow-private-endpoints"), "{chain}");
        let err = resolver.resolve_dns("bucket.minio.storage.svc").await.unwrap_err();
        assert!(crate::error::error_chain(&err).contains("`.svc`"));
        // Allowed, it resolves as usual.
        let addresses = GuardedResolver::new(AllowPrivate).resolve_dns("localhost").await.unwrap();
        assert!(addresses.iter().all(|a| a.is_loopback()) && !addresses.is_empty(), "{addresses:?}");
    }
}
