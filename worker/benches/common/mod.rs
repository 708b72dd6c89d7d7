//! Set-up shared by the benches.

use atelier_worker::inference::{Device, Runtime, RuntimeOptions, default_models_dir};
use std::path::PathBuf;
use std::sync::Arc;

/// The models directory and the ONNX Runtime the benches use: CPU, or CUDA
/// with `ATELIER_WORKER__DEVICE=cuda` (built with the `cuda` feature), one
/// intra-op thread per core. Prints the device.
pub fn runtime() -> (PathBuf, Arc<Runtime>) {
    let dir = default_models_dir();
    let device = if std::env::var("ATELIER_WORKER__DEVICE").as_deref() == Ok("cuda") {
        Device::Cuda
    } else {
        Device::Cpu
    };
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let rt = Runtime::get(&RuntimeOptions {
        library: Some(dir.join("onnxruntime/libonnxruntime.so.1.31.1")),
        device,
        intra_threads: threads,
        // As a worker runs by default (`models.cpu_arena`);
        // `ATELIER_MODELS__CPU_ARENA=false` turns it off.
        cpu_arena: std::env::var("ATELIER_MODELS__CPU_ARENA").as_deref() != Ok("false"),
    })
    .expect("ONNX Runtime: run scripts/fetch-models first");
    println!("device: {:?}, cores: {threads}", rt.device);
    (dir, rt)
}
