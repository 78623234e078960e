//! A real Prometheus server for the tests (Debian's prometheus package).

use std::{
    net::TcpStream,
    path::PathBuf,
    process::{Child, Command, Stdio},
};

use super::http::{free_port, http_get};

/// A Prometheus server, stopped and its data removed on drop.
pub struct Prometheus {
    child: Child,
    dir: PathBuf,
    pub addr: String,
}

impl Prometheus {
    /// Scraping `target` every second over plain HTTP.
    pub fn start(target: &str) -> Prometheus {
        Prometheus::start_with(target, "", &[])
    }

    /// Scraping `target` with `job` (YAML lines of the scrape job, indented
    /// four spaces: `scheme`, `tls_config`, `basic_auth`), and `files`
    /// (name, contents) written beside the config for them to name.
    pub fn start_with(target: &str, job: &str, files: &[(&str, &[u8])]) -> Prometheus {
        let dir = std::env::temp_dir().join(super::unique("tcpstate-prom-"));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, text) in files {
            std::fs::write(dir.join(name), text).unwrap();
        }
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: tcpstate\n{job}    static_configs:\n      - targets: ['{target}']\n"
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (Debian package prometheus)");
        Prometheus { child, dir, addr }
    }

    /// The value of an instant query with one result, if there is one.
    pub fn query(&self, promql: &str) -> Option<f64> {
        let q: String = promql
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        let stream = TcpStream::connect(&self.addr).ok()?;
        drop(stream);
        let (status, body) = http_get(&self.addr, &format!("/api/v1/query?query={q}"), None);
        if !status.contains("200") {
            return None;
        }
        // Chunked or not, the JSON object is the part between the braces.
        let json = &body[body.find('{')?..=body.rfind('}')?];
        let v: serde_json::Value = serde_json::from_str(json).ok()?;
        v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
