//! `--web-config-file`: TLS and basic auth for the metrics endpoint, written
//! as the Prometheus exporter-toolkit's `web-config.yml` that node_exporter
//! users already have: `tls_server_config` (`cert_file`, `key_file`,
//! `client_auth_type`, `client_ca_file`, `min_version`, `max_version`) and
//! `basic_auth_users` (bcrypt hashes). Paths are relative to the file's
//! folder, as there. A key this agent does not implement is an error, not
//! silently ignored: a setting someone relies on for security must not be
//! dropped.

use std::{
    collections::{BTreeMap, HashSet},
    hash::{Hash, Hasher},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use base64::Engine;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use serde::Deserialize;
use tokio_rustls::rustls;

use crate::error::{Error, Result};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    tls_server_config: Option<TlsFile>,
    #[serde(default)]
    basic_auth_users: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    #[serde(default)]
    client_auth_type: Option<String>,
    client_ca_file: Option<PathBuf>,
    min_version: Option<String>,
    max_version: Option<String>,
}

/// What the endpoint enforces (by default: nothing, plain HTTP).
#[derive(Default)]
pub struct WebConfig {
    /// TLS, when configured: plain HTTP is then refused.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub auth: Option<Auth>,
}

impl WebConfig {
    pub fn load(path: &Path) -> Result<WebConfig> {
        let bad = |why: String| Error::WebConfig(path.to_owned(), why);
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let file: File = serde_norway::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let tls = file
            .tls_server_config
            .map(|t| tls_config(&t, dir).map(Arc::new).map_err(bad))
            .transpose()?;
        for (user, hash) in &file.basic_auth_users {
            if hash.parse::<bcrypt::HashParts>().is_err() {
                return Err(bad(format!(
                    "basic_auth_users: {user}'s password is not a bcrypt hash"
                )));
            }
        }
        let auth = (!file.basic_auth_users.is_empty()).then(|| Auth {
            users: file.basic_auth_users,
            verified: Mutex::default(),
        });
        Ok(WebConfig { tls, auth })
    }
}

fn tls_config(t: &TlsFile, dir: &Path) -> std::result::Result<rustls::ServerConfig, String> {
    let at = |p: &Option<PathBuf>, what: &str| {
        p.as_ref()
            .map(|p| dir.join(p))
            .ok_or_else(|| format!("tls_server_config: {what} is required"))
    };
    let (cert_file, key_file) = (at(&t.cert_file, "cert_file")?, at(&t.key_file, "key_file")?);
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_file)
        .and_then(|i| i.collect())
        .map_err(|e| format!("{}: {e}", cert_file.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in it", cert_file.display()));
    }
    let key = PrivateKeyDer::from_pem_file(&key_file)
        .map_err(|e| format!("{}: {e}", key_file.display()))?;
    let versions = versions(t.min_version.as_deref(), t.max_version.as_deref())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&versions)
        .map_err(|e| e.to_string())?;
    let mode = t.client_auth_type.as_deref().unwrap_or("NoClientCert");
    let builder = match mode {
        "NoClientCert" => builder.with_no_client_auth(),
        "RequireAndVerifyClientCert" | "VerifyClientCertIfGiven" => {
            let ca = at(
                &t.client_ca_file,
                "client_ca_file (for client certificates)",
            )?;
            let mut roots = rustls::RootCertStore::empty();
            for c in
                CertificateDer::pem_file_iter(&ca).map_err(|e| format!("{}: {e}", ca.display()))?
            {
                roots
                    .add(c.map_err(|e| format!("{}: {e}", ca.display()))?)
                    .map_err(|e| format!("{}: {e}", ca.display()))?;
            }
            let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            );
            let v = if mode == "VerifyClientCertIfGiven" {
                v.allow_unauthenticated()
            } else {
                v
            };
            builder.with_client_cert_verifier(v.build().map_err(|e| e.to_string())?)
        }
        other => {
            return Err(format!(
                "tls_server_config: client_auth_type {other} is not supported (NoClientCert, VerifyClientCertIfGiven, RequireAndVerifyClientCert are)"
            ));
        }
    };
    let mut cfg = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("{} and {}: {e}", cert_file.display(), key_file.display()))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// `min_version`/`max_version` as exporter-toolkit spells them (its default
/// minimum is TLS 1.2; rustls knows nothing older).
fn versions(
    min: Option<&str>,
    max: Option<&str>,
) -> std::result::Result<Vec<&'static rustls::SupportedProtocolVersion>, String> {
    let rank = |v: &str| match v {
        "TLS12" => Ok(12),
        "TLS13" => Ok(13),
        "TLS10" | "TLS11" => Err(format!("{v} is not supported (TLS12 and TLS13 are)")),
        _ => Err(format!("{v} is not a TLS version (TLS12, TLS13)")),
    };
    let lo = min.map_or(Ok(12), rank)?;
    let hi = max.map_or(Ok(13), rank)?;
    let mut out = Vec::new();
    if lo <= 12 && hi >= 12 {
        out.push(&rustls::version::TLS12);
    }
    if hi >= 13 {
        out.push(&rustls::version::TLS13);
    }
    if out.is_empty() {
        return Err(format!("min_version {min:?} is above max_version {max:?}"));
    }
    Ok(out)
}

/// Basic auth against bcrypt hashes. Checking a bcrypt hash is slow by
/// design (tens of milliseconds), so a user and password that passed are
/// remembered (as a keyed hash, not the password) and pass at once after.
pub struct Auth {
    users: BTreeMap<String, String>,
    verified: Mutex<HashSet<u64>>,
}

/// How many verified logins are remembered.
const REMEMBERED: usize = 64;

impl Auth {
    /// Whether an `Authorization` header's value lets its sender in. Slow the
    /// first time for each login: call it off the runtime's thread.
    pub fn allows(&self, header: Option<&str>) -> bool {
        let Some((user, password)) = header.and_then(basic_credentials) else {
            return false;
        };
        let Some(hash) = self.users.get(&user) else {
            return false;
        };
        let key = {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (&user, &password, hash).hash(&mut h);
            h.finish()
        };
        if self.verified.lock().expect("auth lock").contains(&key) {
            return true;
        }
        let ok = bcrypt::verify(&password, hash).unwrap_or(false);
        if ok {
            let mut v = self.verified.lock().expect("auth lock");
            if v.len() >= REMEMBERED {
                v.clear();
            }
            v.insert(key);
        }
        ok
    }
}

/// `Basic base64(user:password)` → (user, password).
fn basic_credentials(header: &str) -> Option<(String, String)> {
    let (scheme, b64) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (u, p) = text.split_once(':')?;
    Some((u.to_owned(), p.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "tcpstate-webcfg-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn rand_suffix() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        N.fetch_add(1, Ordering::Relaxed)
    }

    #[test]
    fn unknown_keys_and_unsupported_settings_are_errors_that_name_them() {
        let d = dir();
        for (text, want) in [
            ("basic_auth_users: {alice: notahash}\n", "not a bcrypt hash"),
            (
                "tls_server_config: {cert_file: a.crt}\n",
                "key_file is required",
            ),
            ("basic_auth_user: {}\n", "basic_auth_user"),
            (
                "tls_server_config: {cert_file: a, key_file: b, cipher_suites: []}\n",
                "cipher_suites",
            ),
        ] {
            let p = write(&d, "web.yml", text);
            let e = WebConfig::load(&p).err().expect("an error").to_string();
            assert!(e.contains(want) && e.contains("web.yml"), "{text}: {e}");
        }
        assert!(versions(Some("TLS13"), Some("TLS12")).is_err());
        assert!(
            versions(Some("TLS10"), None)
                .unwrap_err()
                .contains("not supported")
        );
        assert_eq!(versions(None, None).unwrap().len(), 2);
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn basic_auth_checks_the_bcrypt_hash_and_remembers_a_good_login() {
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let auth = Auth {
            users: BTreeMap::from([("alice".to_owned(), hash)]),
            verified: Mutex::default(),
        };
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        assert!(auth.allows(Some(&format!("Basic {}", b64("alice:s3cret")))));
        assert!(auth.allows(Some(&format!("basic {}", b64("alice:s3cret")))));
        assert_eq!(auth.verified.lock().unwrap().len(), 1);
        assert!(!auth.allows(Some(&format!("Basic {}", b64("alice:wrong")))));
        assert!(!auth.allows(Some(&format!("Basic {}", b64("bob:s3cret")))));
        assert!(!auth.allows(Some("Bearer abc")));
        assert!(!auth.allows(None));
    }
}
