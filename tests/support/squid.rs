//! squid (Debian's) as a forward HTTP proxy standing in for a P2P agent such as Dragonfly's
//! dfdaemon: lsmd sends blob requests through it; its access log shows what it carried.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::nbd::free_port;

/// A running squid; killed when dropped.
pub struct Squid {
    child: Option<Child>,
    dir: PathBuf,
    /// `http://127.0.0.1:<port>`.
    pub url: String,
}

impl Squid {
    /// Starts squid in the foreground with its files under `dir`.
    pub fn start(dir: &Path) -> Squid {
        std::fs::create_dir_all(dir).expect("squid dir");
        // squid drops privileges to `proxy` for some work: let it write its logs here.
        let _ = Command::new("chmod").arg("777").arg(dir).status();
        let port = free_port();
        let d = dir.display();
        std::fs::write(
            dir.join("squid.conf"),
            format!(
                "http_port 127.0.0.1:{port}\nhttp_access allow all\ncache deny all\n\
                 access_log stdio:{d}/access.log\ncache_log {d}/cache.log\n\
                 pid_filename {d}/squid.pid\ncoredump_dir {d}\n"
            ),
        )
        .expect("squid.conf");
        let child = Command::new("squid")
            .args(["-N", "-f"])
            .arg(dir.join("squid.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("squid (apt install squid)");
        for _ in 0..400 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        Squid {
            child: Some(child),
            dir: dir.to_path_buf(),
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    /// Requests it carried (its access log).
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
    }

    /// Stops it: the agent is down.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Squid {
    fn drop(&mut self) {
        self.stop();
    }
}
