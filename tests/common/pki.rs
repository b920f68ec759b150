//! Certificates made for a test: a CA, a server certificate it signed for
//! `localhost` and `127.0.0.1`, and a client certificate from a second CA,
//! written as PEM files to a folder of the test's own (removed on drop).

use std::path::PathBuf;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

/// A CA: its certificate (PEM) and what signs with it.
pub struct Authority {
    pub pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Authority {
    /// A new self-signed CA called `name`.
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        Self {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate and key (PEM) for `names` (DNS names or IP
    /// addresses), signed by this CA.
    pub fn sign(&self, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &self.issuer)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// A folder of PEM files: `ca.pem`, `server.pem`, `server.key`, and for
/// mutual TLS `client-ca.pem`, `client.pem`, `client.key`.
pub struct Pki {
    pub dir: PathBuf,
    pub ca: Authority,
    pub client_ca: Authority,
    pub client_cert: String,
    pub client_key: String,
}

impl Pki {
    /// Makes and writes everything.
    pub fn new() -> Self {
        let dir =
            std::env::temp_dir().join(format!("leasehold-tls-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = Authority::new("leasehold test ca");
        let client_ca = Authority::new("leasehold test client ca");
        let (client_cert, client_key) = client_ca.sign(&["worker-1"]);
        let pki = Self {
            dir,
            ca,
            client_ca,
            client_cert,
            client_key,
        };
        pki.server_signed_by(&pki.ca);
        std::fs::write(pki.path("ca.pem"), &pki.ca.pem).unwrap();
        std::fs::write(pki.path("client-ca.pem"), &pki.client_ca.pem).unwrap();
        pki
    }

    /// Writes a new server certificate and key, signed by `ca`, over the
    /// old ones.
    pub fn server_signed_by(&self, ca: &Authority) {
        let (cert, key) = ca.sign(&["localhost", "127.0.0.1"]);
        std::fs::write(self.path("server.pem"), cert).unwrap();
        std::fs::write(self.path("server.key"), key).unwrap();
    }

    /// A file of the folder.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The server's TLS settings on `config`.
    pub fn serve_with(&self, config: &mut leasehold::config::Config, mutual: bool) {
        config.tls_cert = Some(self.path("server.pem"));
        config.tls_key = Some(self.path("server.key"));
        if mutual {
            config.tls_client_ca = Some(self.path("client-ca.pem"));
        }
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
