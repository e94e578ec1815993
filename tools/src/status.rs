//! `lsmctl status`: what a running lsmd serves, from its `--metrics` address.

use crate::cli::{CliError, CliResult};

/// Arguments of `lsmctl status`.
#[derive(clap::Args)]
pub struct StatusArgs {
    /// lsmd's `--metrics` address.
    #[arg(long, default_value = "127.0.0.1:9810")]
    metrics: String,
    /// Print lsmd's JSON as is.
    #[arg(long)]
    json: bool,
}

pub fn status(a: StatusArgs) -> CliResult {
    let url = format!("http://{}/status", a.metrics);
    let text = ureq::get(&url)
        .timeout(std::time::Duration::from_secs(5))
        .call()
        .map_err(|e| {
            CliError(format!(
                "{url}: {e} (is lsmd running with --metrics {}?)",
                a.metrics
            ))
        })?
        .into_string()?;
    if a.json {
        println!("{text}");
        return Ok(());
    }
    let v: serde_json::Value = serde_json::from_str(&text)?;
    for e in v["exports"].as_array().into_iter().flatten() {
        println!(
            "export {:<16} {:>14} bytes  {} layers  {}  upper data {} bytes  cached {} bytes",
            e["name"].as_str().unwrap_or("?"),
            e["size"],
            e["layers"],
            if e["read_only"].as_bool() == Some(true) {
                "read-only"
            } else {
                "writable "
            },
            e["upper_data_bytes"].as_u64().unwrap_or(0),
            e["cache_bytes"].as_u64().unwrap_or(0)
        );
    }
    match v.get("cache").filter(|c| !c.is_null()) {
        Some(c) => {
            println!(
                "cache  {} of {} bytes, {} chunks, {} hits, {} misses",
                c["bytes"], c["limit"], c["entries"], c["hits"], c["misses"]
            );
            let (phys, logical) = (
                c["bytes"].as_u64().unwrap_or(0),
                c["logical_bytes"].as_u64().unwrap_or(0),
            );
            println!(
                "cache  physical {phys} bytes, logical {logical} bytes (each export's cached chunks \
                 counted as if it had its own cache){}",
                if phys > 0 && logical > phys {
                    format!("; shared chunks save {:.1} %", 100.0 * (1.0 - phys as f64 / logical as f64))
                } else {
                    String::new()
                }
            );
        }
        None => println!("cache  none (lsmd runs without --cache-dir)"),
    }
    println!(
        "registry  {} bytes fetched in {} reads, {} errors",
        v["registry"]["bytes_fetched"], v["registry"]["requests"], v["registry"]["errors"]
    );
    Ok(())
}
