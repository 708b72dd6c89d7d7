//! `atelier`: one binary, every role. Loads config, starts telemetry, runs.

use clap::Parser;

/// jemalloc, whose background threads give freed memory back to the system
/// within seconds (glibc's allocator kept what a flood of connections had
/// used for as long as the process lived).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    // Purging on background threads: memory returns even while the process
    // idles (without them, only allocation activity purges).
    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        eprintln!("warning: jemalloc background threads unavailable: {e}");
    }
    let cli = atelier::cli::Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.spawn(allocator_gauges());
    match runtime.block_on(atelier::cli::main(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(atelier::client::exit_code(&e))
        }
    }
}

/// What the allocator holds, for `/metrics`: `atelier_allocator_allocated_bytes`
/// (in use) and `atelier_allocator_resident_bytes` (in physical memory).
async fn allocator_gauges() {
    loop {
        if tikv_jemalloc_ctl::epoch::advance().is_ok() {
            if let Ok(b) = tikv_jemalloc_ctl::stats::allocated::read() {
                metrics::gauge!("atelier_allocator_allocated_bytes").set(b as f64);
            }
            if let Ok(b) = tikv_jemalloc_ctl::stats::resident::read() {
                metrics::gauge!("atelier_allocator_resident_bytes").set(b as f64);
            }
        }
        tokio::time::sleep(std::time::Duration::from_secs(10)).await;
    }
}
