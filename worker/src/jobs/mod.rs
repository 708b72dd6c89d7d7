//! Job handlers, one file per job kind. [`execute`] picks the handler once,
//! from the task's typed spec: adding a kind is a new file here and one
//! line in the `match` below.
//!
//! Every handler reads its inputs from the object store (their keys travel
//! in the task), runs its models on the blocking pool through
//! [`off_runtime`], and stores its results with [`store_result`] under keys
//! unique to the run.

mod assets;
mod drafts;
mod extraction;
mod flat;
mod generate;
mod identity;
mod packshot;
mod prediction;
mod studio;
mod swap;
mod training;

use crate::context::WorkerContext;
use crate::failure::TaskFailure;
use atelier_shared::domain::packshot::ImageFormat;
use atelier_shared::domain::{JobSpec, OutputResult, Task, WorkQueue};
use bytes::Bytes;

/// Runs the task's kind.
pub(crate) async fn execute(ctx: &WorkerContext, task: &Task) -> Result<OutputResult, TaskFailure> {
    if !ctx.fault_delay.is_zero() {
        tokio::time::sleep(ctx.fault_delay).await;
    }
    match &task.work {
        JobSpec::CreatePackshot(spec) => packshot::run(ctx, task, spec).await,
        JobSpec::ModelSwap(spec) => swap::run(ctx, task, spec).await,
        JobSpec::IdentityPreprocessing(spec) => identity::run(ctx, task, spec).await,
        JobSpec::Flat2Model(spec) => flat::run(ctx, task, spec).await,
        JobSpec::IdentityCreation(spec) => drafts::run(ctx, task, spec).await,
        JobSpec::Studio(spec) => studio::run(ctx, task, spec).await,
        JobSpec::StudioRestore(spec) => studio::restore(ctx, task, spec).await,
        JobSpec::Training(spec) => training::run(ctx, task, spec).await,
        JobSpec::Prediction(spec) => prediction::run(ctx, task, spec).await,
        JobSpec::PresetExtraction(spec) => extraction::run(ctx, task, spec).await,
        JobSpec::AssetTagging(spec) => assets::run(ctx, task, spec).await,
    }
}

/// Whether this worker can run the kinds of `queue` with what it has
/// loaded: the face queues need the face models, the generative queue a
/// generator route.
pub(crate) fn serves(ctx: &WorkerContext, queue: WorkQueue) -> bool {
    match queue {
        WorkQueue::Packshot => true,
        WorkQueue::Swap | WorkQueue::Identity => ctx.faces.is_some(),
        WorkQueue::Generate => !ctx.generators.is_empty(),
        WorkQueue::Training => ctx.trainers.as_ref().is_some_and(|t| !t.is_empty()),
    }
}

/// Runs `work` on the blocking pool, bounded by `worker.task_timeout_secs`;
/// a panic is a retryable failure.
pub(crate) async fn off_runtime<T: Send + 'static>(
    ctx: &WorkerContext,
    work: impl FnOnce() -> Result<T, TaskFailure> + Send + 'static,
) -> Result<T, TaskFailure> {
    match tokio::time::timeout(ctx.task_timeout, tokio::task::spawn_blocking(work)).await {
        Err(_) => Err(TaskFailure::retryable(format!(
            "pipeline exceeded {} s",
            ctx.task_timeout.as_secs()
        ))),
        Ok(Err(join)) if join.is_panic() => Err(TaskFailure::retryable("pipeline panicked")),
        Ok(Err(join)) => Err(TaskFailure::retryable(format!(
            "pipeline task failed: {join}"
        ))),
        Ok(Ok(r)) => r,
    }
}

/// The bytes of input `file_id` of the task.
pub(crate) async fn input(
    ctx: &WorkerContext,
    task: &Task,
    file_id: &str,
) -> Result<Bytes, TaskFailure> {
    let key = task.inputs.key_of(file_id).ok_or_else(|| {
        TaskFailure::permanent(format!(
            "input image {file_id} was not resolved when the job was admitted"
        ))
    })?;
    Ok(ctx.objects.get(key).await?)
}

/// The output of a task that measured a picture: `preview` (stored as a
/// JPEG with its thumbnail) and `report`, its description.
pub(crate) async fn measured<R: serde::Serialize>(
    ctx: &WorkerContext,
    task: &Task,
    preview: &image::RgbaImage,
    model_used: String,
    started: std::time::Instant,
    report: &R,
) -> Result<OutputResult, TaskFailure> {
    let (width, height) = preview.dimensions();
    let encoded = Encoded {
        full: crate::imaging::encode(preview, ImageFormat::Jpg)?,
        format: ImageFormat::Jpg,
        thumb: crate::imaging::thumbnail(preview)?,
    };
    let (full_key, thumb_key) = store_result(ctx, &task.run_base(), encoded).await?;
    Ok(OutputResult {
        full_key,
        thumb_key,
        format: ImageFormat::Jpg.ext().to_string(),
        width,
        height,
        model_used,
        processing_ms: started.elapsed().as_millis() as i64,
        input_description: serde_json::to_value(report)
            .map_err(|e| TaskFailure::retryable(format!("cannot describe the result: {e}")))?,
        post_processed: false,
    })
}

/// An encoded result and its thumbnail.
pub(crate) struct Encoded {
    pub full: Vec<u8>,
    pub format: ImageFormat,
    pub thumb: Vec<u8>,
}

/// Uploads a result and its thumbnail under the run's keys; `(full, thumb)`.
pub(crate) async fn store_result(
    ctx: &WorkerContext,
    base: &str,
    e: Encoded,
) -> Result<(String, String), TaskFailure> {
    let full_key = format!("{base}.{}", e.format.ext());
    let thumb_key = format!("{base}-thumb.jpg");
    ctx.objects
        .put(&full_key, Bytes::from(e.full), e.format.content_type())
        .await?;
    ctx.objects
        .put(
            &thumb_key,
            Bytes::from(e.thumb),
            ImageFormat::Jpg.content_type(),
        )
        .await?;
    Ok((full_key, thumb_key))
}
