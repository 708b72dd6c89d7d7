//! Outbound HTTP that a client's input can aim (webhook URLs, profile photo
//! URLs): the SSRF guard.
//!
//! A URL is acceptable when it is `http`/`https`, carries no credentials, and
//! every address its host resolves to is public. Loopback, private (RFC 1918,
//! unique-local), link-local (cloud metadata lives there), carrier-grade NAT,
//! unspecified, multicast, broadcast, documentation and reserved ranges are
//! refused, including IPv4 addresses hidden in IPv6 (mapped, NAT64). The
//! operator's `egress.allow` list (host names or CIDRs) lifts the refusal for
//! what it names, e.g. `127.0.0.1` for local testing.
//!
//! The check is not only done once at validation time: [`EgressPolicy::client`]
//! builds a `reqwest` client whose resolver applies the same rules to every
//! connection, redirects included, so a name that resolves to a public
//! address when saved and to `127.0.0.1` when used (DNS rebinding) is still
//! refused. Proxies from the environment are ignored for the same reason.

use ipnet::IpNet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use url::Url;

/// Why an outbound URL is refused. The message names the problem for a 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EgressError {
    #[error("{0}")]
    BadUrl(String),
    #[error("{host} resolves to {addr}, a {range} address; outbound requests may not reach it")]
    Refused {
        host: String,
        addr: IpAddr,
        range: &'static str,
    },
    #[error("cannot resolve {host}: {reason}")]
    Unresolvable { host: String, reason: String },
}

/// The SSRF rules with the operator's exceptions.
#[derive(Debug, Clone, Default)]
pub struct EgressPolicy {
    hosts: Vec<String>,
    nets: Vec<IpNet>,
}

/// The range an address falls in when outbound requests may not reach it.
pub fn forbidden_range(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return forbidden_v4(v4);
            }
            let seg = v6.segments();
            let v4_of = |hi: u16, lo: u16| {
                Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8)
            };
            // NAT64 (64:ff9b::/96) embeds an IPv4 address in the last 32 bits.
            if seg[0] == 0x64 && seg[1] == 0xff9b && seg[2..6] == [0, 0, 0, 0] {
                return forbidden_v4(v4_of(seg[6], seg[7]));
            }
            // 6to4 (2002::/16) embeds one in bits 16..48.
            if seg[0] == 0x2002 {
                return forbidden_v4(v4_of(seg[1], seg[2]));
            }
            if seg[0] == 0x64 && seg[1] == 0xff9b && seg[2] == 1 {
                Some("local-use NAT64")
            } else if seg[0] == 0x2001 && seg[1] == 0 {
                Some("Teredo")
            } else if seg[0] == 0x100 && seg[1..4] == [0, 0, 0] {
                Some("discard-only")
            } else if seg[0] & 0xffc0 == 0xfec0 {
                Some("site-local")
            } else if seg[..4] == [0, 0, 0, 0] && seg[4] == 0xffff && seg[5] == 0 {
                // IPv4-translated (SIIT) ::ffff:0:a.b.c.d
                Some("IPv4-translated")
            } else if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if v6.is_multicast() {
                Some("multicast")
            } else if seg[0] & 0xfe00 == 0xfc00 {
                Some("private (unique-local)")
            } else if seg[0] & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if seg[0] == 0x2001 && seg[1] == 0x0db8 {
                Some("documentation")
            } else if v6.segments()[..6] == [0, 0, 0, 0, 0, 0] {
                // Deprecated IPv4-compatible addresses (::a.b.c.d).
                Some("reserved")
            } else {
                None
            }
        }
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() {
        Some("private")
    } else if ip.is_link_local() {
        Some("link-local (cloud metadata)")
    } else if ip.is_unspecified() || o[0] == 0 {
        Some("unspecified")
    } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
        Some("carrier-grade NAT")
    } else if ip.is_broadcast() {
        Some("broadcast")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if ip.is_documentation() {
        Some("documentation")
    } else if o[0] == 198 && (o[1] & 0xfe) == 18 {
        Some("benchmarking")
    } else if o[0] == 192 && o[1] == 0 && o[2] == 0 {
        Some("IETF protocol assignment")
    } else if o[0] >= 240 {
        Some("reserved")
    } else {
        None
    }
}

impl EgressPolicy {
    /// Parses `egress.allow`: each entry is a CIDR (`10.0.0.0/8`), an address
    /// (`127.0.0.1`) or a host name (`hooks.internal`, matched exactly,
    /// case-insensitively).
    pub fn new(allow: &[String]) -> Result<EgressPolicy, String> {
        let mut p = EgressPolicy::default();
        for raw in allow {
            let e = raw.trim();
            if e.is_empty() {
                continue;
            }
            if let Ok(net) = e.parse::<IpNet>() {
                p.nets.push(net);
            } else if let Ok(ip) = e.parse::<IpAddr>() {
                p.nets.push(IpNet::from(ip));
            } else if e.contains('/') {
                return Err(format!(
                    "egress.allow: {e:?} is neither a CIDR nor a host name"
                ));
            } else {
                p.hosts.push(e.trim_end_matches('.').to_ascii_lowercase());
            }
        }
        Ok(p)
    }

    fn host_allowed(&self, host: &str) -> bool {
        let h = host.trim_end_matches('.').to_ascii_lowercase();
        self.hosts.contains(&h)
    }

    /// `Ok` when `ip` may be reached (for `host`), else why not.
    pub fn check_ip(&self, host: &str, ip: IpAddr) -> Result<(), EgressError> {
        if self.host_allowed(host) || self.nets.iter().any(|n| n.contains(&ip)) {
            return Ok(());
        }
        match forbidden_range(ip) {
            Some(range) => Err(EgressError::Refused {
                host: host.to_string(),
                addr: ip,
                range,
            }),
            None => Ok(()),
        }
    }

    /// Checks what can be checked without DNS: scheme, credentials, length,
    /// and a literal address host. Returns the host.
    pub fn check_syntax<'u>(&self, url: &'u Url) -> Result<&'u str, EgressError> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(EgressError::BadUrl(format!(
                "URL scheme {:?} is not allowed; use http or https",
                url.scheme()
            )));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(EgressError::BadUrl(
                "URLs with embedded credentials are not allowed".into(),
            ));
        }
        let host = match url.host() {
            Some(url::Host::Domain(d)) => d,
            Some(url::Host::Ipv4(ip)) => {
                self.check_ip(&ip.to_string(), IpAddr::V4(ip))?;
                url.host_str().unwrap_or_default()
            }
            Some(url::Host::Ipv6(ip)) => {
                self.check_ip(&ip.to_string(), IpAddr::V6(ip))?;
                url.host_str().unwrap_or_default()
            }
            None => return Err(EgressError::BadUrl("URL has no host".into())),
        };
        Ok(host)
    }

    /// Parses and fully checks a client-supplied URL, resolving its host.
    pub async fn check_url(&self, raw: &str) -> Result<Url, EgressError> {
        if raw.len() > 2048 {
            return Err(EgressError::BadUrl(
                "URL is longer than 2048 characters".into(),
            ));
        }
        let url = Url::parse(raw)
            .map_err(|e| EgressError::BadUrl(format!("not an absolute URL: {e}")))?;
        let host = self.check_syntax(&url)?.to_string();
        if matches!(url.host(), Some(url::Host::Domain(_))) {
            let port = url.port_or_known_default().unwrap_or(80);
            self.resolve(&host, port).await?;
        }
        Ok(url)
    }

    /// Resolves `host` and refuses it if any address is forbidden (a name
    /// mixing public and private addresses is a rebinding attempt).
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, EgressError> {
        let lookup = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::lookup_host((host.trim_end_matches('.'), port)),
        )
        .await
        .map_err(|_| EgressError::Unresolvable {
            host: host.to_string(),
            reason: "DNS lookup timed out".into(),
        })?
        .map_err(|e| EgressError::Unresolvable {
            host: host.to_string(),
            reason: e.to_string(),
        })?;
        let addrs: Vec<SocketAddr> = lookup.collect();
        if addrs.is_empty() {
            return Err(EgressError::Unresolvable {
                host: host.to_string(),
                reason: "no addresses".into(),
            });
        }
        for a in &addrs {
            self.check_ip(host, a.ip())?;
        }
        Ok(addrs)
    }

    /// A client that enforces the policy on every connection and redirect.
    /// Only 307/308 redirects are followed (they keep a POST a POST); any
    /// other 3xx is returned as the response. For webhooks.
    pub fn client(
        &self,
        timeout: Duration,
        max_redirects: usize,
    ) -> reqwest::Result<reqwest::Client> {
        // 301/302/303 would turn a POST into a bodiless GET: stop and let
        // the caller see the 3xx. 307/308 keep method and body.
        self.build_client(timeout, max_redirects, &[307, 308])
    }

    /// As [`EgressPolicy::client`], for GETs (photo fetches): every
    /// redirect status is followed, each target checked like the first.
    pub fn fetch_client(
        &self,
        timeout: Duration,
        max_redirects: usize,
    ) -> reqwest::Result<reqwest::Client> {
        self.build_client(timeout, max_redirects, &[301, 302, 303, 307, 308])
    }

    fn build_client(
        &self,
        timeout: Duration,
        max_redirects: usize,
        follow: &'static [u16],
    ) -> reqwest::Result<reqwest::Client> {
        let redirect_policy = self.clone();
        reqwest::Client::builder()
            .no_proxy()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .dns_resolver(Arc::new(GuardedResolver(self.clone())))
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                if !follow.contains(&attempt.status().as_u16()) {
                    return attempt.stop();
                }
                if attempt.previous().len() > max_redirects {
                    return attempt.error(format!("more than {max_redirects} redirects"));
                }
                match redirect_policy.check_syntax(attempt.url()) {
                    Ok(_) => attempt.follow(),
                    Err(e) => attempt.error(e),
                }
            }))
            .user_agent(concat!("atelier/", env!("CARGO_PKG_VERSION")))
            .build()
    }
}

/// Resolves names for [`EgressPolicy::client`], refusing forbidden addresses.
struct GuardedResolver(EgressPolicy);

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.0.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs = policy.resolve(&host, 0).await?;
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Reads at most `limit` bytes of a response body (the rest is dropped).
pub async fn read_capped(resp: reqwest::Response, limit: usize) -> reqwest::Result<Vec<u8>> {
    use futures::StreamExt;
    let mut out = Vec::new();
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
        let room = limit.saturating_sub(out.len());
        out.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if out.len() >= limit {
            break;
        }
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn refused(p: &EgressPolicy, ip: &str) -> bool {
        let ip: IpAddr = ip.parse().expect("an address");
        p.check_ip("h", ip).is_err()
    }

    #[test]
    fn private_and_special_ranges_are_refused() {
        let p = EgressPolicy::default();
        for ip in [
            "127.0.0.1",
            "127.8.9.10",
            "10.0.0.1",
            "172.16.5.4",
            "192.168.1.1",
            "169.254.169.254",
            "100.100.100.200",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "198.18.0.1",
            "240.0.0.1",
            "::1",
            "::",
            "fd00:ec2::254",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "::7f00:1",
            "2002:a9fe:a9fe::1",
            "2002:7f00:1::",
            "64:ff9b:1::1",
            "2001:0:4136:e378::1",
            "100::1",
            "fec0::1",
            "::ffff:0:8.8.8.8",
        ] {
            assert!(refused(&p, ip), "{ip} should be refused");
        }
        for ip in [
            "93.184.216.34",
            "8.8.8.8",
            "2606:4700::1111",
            "100.128.0.1",
            "2002:808:808::1",
        ] {
            assert!(!refused(&p, ip), "{ip} should be allowed");
        }
    }

    #[test]
    fn the_allow_list_lifts_refusals_for_what_it_names() {
        let p = EgressPolicy::new(&[
            "127.0.0.1".into(),
            "10.1.0.0/16".into(),
            "Hooks.Internal".into(),
        ])
        .unwrap();
        assert!(!refused(&p, "127.0.0.1"));
        assert!(refused(&p, "127.0.0.2"));
        assert!(!refused(&p, "10.1.2.3"));
        assert!(refused(&p, "10.2.0.1"));
        assert!(
            p.check_ip("hooks.internal.", "10.9.9.9".parse().unwrap())
                .is_ok()
        );
        assert!(EgressPolicy::new(&["not a/cidr".into()]).is_err());
    }

    #[test]
    fn syntax_checks_name_the_problem() {
        let p = EgressPolicy::default();
        let e = |s: &str| {
            p.check_syntax(&Url::parse(s).unwrap())
                .unwrap_err()
                .to_string()
        };
        assert!(e("ftp://example.com/x").contains("scheme"));
        assert!(e("http://user:pw@example.com/").contains("credentials"));
        assert!(e("http://169.254.169.254/latest/meta-data").contains("link-local"));
        assert!(e("http://[::1]:8080/").contains("loopback"));
        assert!(
            p.check_syntax(&Url::parse("https://example.com/hook").unwrap())
                .is_ok()
        );
    }

    #[tokio::test]
    async fn names_resolving_to_loopback_are_refused() {
        let p = EgressPolicy::default();
        let err = p.check_url("http://localhost:9/hook").await.unwrap_err();
        assert!(
            matches!(
                err,
                EgressError::Refused {
                    range: "loopback",
                    ..
                }
            ),
            "{err}"
        );
        let allowed = EgressPolicy::new(&["localhost".into()]).unwrap();
        assert!(allowed.check_url("http://localhost:9/hook").await.is_ok());
    }

    /// A server on 127.0.0.1 that answers every request with `reply`.
    async fn answering(reply: &'static [u8]) -> SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(reply).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn redirects_that_would_drop_the_body_are_not_followed() {
        let addr = answering(
            b"HTTP/1.1 302 Found\r\nLocation: https://example.com/x\r\nContent-Length: 0\r\n\r\n",
        )
        .await;
        let p = EgressPolicy::new(&["127.0.0.1".into()]).unwrap();
        let client = p.client(Duration::from_secs(5), 3).unwrap();
        let resp = client
            .post(format!("http://{addr}/hook"))
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.status().as_u16(),
            302,
            "returned, not followed as a GET"
        );
    }

    #[tokio::test]
    async fn the_client_refuses_a_redirect_to_a_private_address() {
        let addr = answering(b"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://10.0.0.1/x\r\nContent-Length: 0\r\n\r\n").await;
        let p = EgressPolicy::new(&["127.0.0.1".into()]).unwrap();
        let client = p.client(Duration::from_secs(5), 3).unwrap();
        let err = client
            .post(format!("http://{addr}/hook"))
            .send()
            .await
            .unwrap_err();
        assert!(err.is_redirect(), "{err:?}");
        let chain = format!("{err:?}");
        assert!(chain.contains("private"), "{chain}");
    }
}
