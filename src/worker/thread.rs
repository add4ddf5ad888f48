//! The worker thread: owns the [`Engine`], runs [`Command`]s one at a time and reports [`Event`]s.
//!
//! ```text
//!   UI thread                                   "attend-worker" thread
//!   WorkerHandle ── Command (bounded) ───────▶  serve loop ─▶ Engine::generate(_edit)
//!        │ cancel: trips the run's token ─────────────────────▶ checked before each step
//!        ▲                                          │  after each step: emit Step,
//!        └──────── Event (bounded) ◀────────────────┘  drain commands (probe, exports)
//!   waker() is called after every event, so the UI repaints (the UI sets it to request_repaint)
//! ```
//!
//! Cancelling: the handle marks runs as cancelled in a shared atomic (`cancel_up_to`: every run id
//! up to it is cancelled) *before* it sends the command, and trips the [`CancelToken`] of the run
//! being generated, which is the token the engine checks before each step. So a running generation
//! stops at its next step boundary even though its command is still queued, and a queued one never
//! starts. Before a run starts, the worker takes every queued command off the channel: a run that a
//! later queued run supersedes ends at once (`Cancelled` after 0 steps), so a burst of edits from a
//! dragged slider runs only its latest. A panic in the engine is caught; the worker reports it,
//! builds a fresh engine and reloads the last model.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};

use crate::hook::CancelToken;
use crate::worker::appearance::{AppearanceResult, AppearanceTransferParams, AppearanceUpdate};
use crate::worker::backend::{Engine, InversionOutput, RunObserver, RunOutput, SelfAttentionQuery};
use crate::worker::error::{Disconnected, EngineError, SendCommandError};
use crate::worker::export::{write_png_file, write_text_file};
use crate::worker::plain::{RgbImage, SelfAttentionMap};
use crate::worker::protocol::{
    BlendMask, Branch, Command, EditInfo, EditSpec, Event, GenerateParams, InversionParams,
    ModelLoadProgress, ModelSource, Products, PromptInfo, StepFrame,
};
use crate::worker::style_set::{StyleSetOutput, StyleSetParams};

/// Builds a fresh engine; called on the worker thread at start and after a panic.
pub type EngineFactory = Arc<dyn Fn() -> Box<dyn Engine> + Send + Sync>;

/// Called after every event, to wake the UI (`move || ctx.request_repaint()`).
pub type Waker = Arc<dyn Fn() + Send + Sync>;

/// Capacity of the command queue (UI -> worker).
pub const COMMAND_CAPACITY: usize = 64;
/// Capacity of the event queue (worker -> UI). The worker waits when it is full (backpressure).
pub const EVENT_CAPACITY: usize = 64;

/// State shared by the handle and the thread.
struct Shared {
    /// Every run id `<=` this is cancelled. Run ids start at 1, so 0 cancels nothing.
    cancel_up_to: AtomicU64,
    /// The run being generated and the token its engine checks.
    running: Mutex<Option<(u64, CancelToken)>>,
    /// Wakes the UI after each event.
    waker: RwLock<Option<Waker>>,
    /// The running model load's stage (`None` when no load runs).
    load_progress: Mutex<Option<ModelLoadProgress>>,
    /// Set to stop the running model load at its next stage.
    load_cancel: AtomicBool,
}

impl Shared {
    /// Cancels every run up to `run_id`: queued ones never start, a running one stops at its next
    /// step boundary.
    fn cancel_up_to(&self, run_id: u64) {
        self.cancel_up_to.fetch_max(run_id, Ordering::SeqCst);
        if let Some((running_id, token)) = &*self.running() {
            if *running_id <= run_id {
                token.cancel();
            }
        }
    }

    /// Registers `run_id` as the running run and returns its cancel token, already tripped when the
    /// run was cancelled before it started. The mark is read under the lock that
    /// [`Self::cancel_up_to`] takes after setting it, so no cancel is lost in between.
    fn begin_run(&self, run_id: u64) -> CancelToken {
        let token = CancelToken::new();
        let mut running = self.running();
        if run_id <= self.cancel_up_to.load(Ordering::SeqCst) {
            token.cancel();
        }
        *running = Some((run_id, token.clone()));
        token
    }

    /// No run is being generated any more.
    fn end_run(&self) {
        *self.running() = None;
    }

    fn running(&self) -> MutexGuard<'_, Option<(u64, CancelToken)>> {
        // The guarded value is a plain id and token; a panic elsewhere cannot leave it half-written.
        match self.running.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn wake(&self) {
        let waker = match self.waker.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        if let Some(waker) = waker {
            waker();
        }
    }
}

/// The UI's side of the worker: sends commands without blocking, receives events.
///
/// Dropping the handle cancels any run and lets the thread finish on its own (it is not joined, so a
/// long step never blocks the UI).
pub struct WorkerHandle {
    commands: Sender<Command>,
    events: Receiver<Event>,
    shared: Arc<Shared>,
    last_run_id: u64,
}

impl WorkerHandle {
    /// Starts the named worker thread `attend-worker` with an engine from `factory`.
    pub fn spawn(factory: EngineFactory) -> std::io::Result<Self> {
        let (command_tx, command_rx) = crossbeam_channel::bounded(COMMAND_CAPACITY);
        let (event_tx, event_rx) = crossbeam_channel::bounded(EVENT_CAPACITY);
        let shared = Arc::new(Shared {
            cancel_up_to: AtomicU64::new(0),
            running: Mutex::new(None),
            waker: RwLock::new(None),
            load_progress: Mutex::new(None),
            load_cancel: AtomicBool::new(false),
        });
        let thread_shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("attend-worker".to_owned())
            .spawn(move || {
                worker_main(
                    &factory,
                    &command_rx,
                    &Outbox {
                        events: event_tx,
                        shared: thread_shared,
                    },
                );
            })?;
        Ok(Self {
            commands: command_tx,
            events: event_rx,
            shared,
            last_run_id: 0,
        })
    }

    /// Sets the closure called after every event (the UI passes `move || ctx.request_repaint()`).
    pub fn set_waker(&self, waker: impl Fn() + Send + Sync + 'static) {
        let waker: Waker = Arc::new(waker);
        match self.shared.waker.write() {
            Ok(mut guard) => *guard = Some(waker),
            Err(poisoned) => *poisoned.into_inner() = Some(waker),
        }
    }

    /// Starts a generation, superseding (cancelling) any earlier one. Returns the new run id.
    pub fn generate(&mut self, params: GenerateParams) -> Result<u64, SendCommandError> {
        let run_id = self.last_run_id + 1;
        self.shared.cancel_up_to(run_id - 1);
        self.send(Command::Generate { run_id, params })?;
        self.last_run_id = run_id;
        Ok(run_id)
    }

    /// Starts a Prompt-to-Prompt edit ([`Command::GenerateEdit`]), superseding (cancelling) any
    /// earlier run. Returns the new run id.
    pub fn generate_edit(
        &mut self,
        params: GenerateParams,
        spec: Option<EditSpec>,
    ) -> Result<u64, SendCommandError> {
        let run_id = self.last_run_id + 1;
        self.shared.cancel_up_to(run_id - 1);
        self.send(Command::GenerateEdit {
            run_id,
            params,
            spec,
        })?;
        self.last_run_id = run_id;
        Ok(run_id)
    }

    /// Inverts a real image ([`Command::Invert`]; `image` already fitted to a size the model
    /// takes), superseding (cancelling) any earlier run; [`Self::cancel`] cancels it. Returns the
    /// request's run id.
    pub fn invert(
        &mut self,
        image: RgbImage,
        params: InversionParams,
    ) -> Result<u64, SendCommandError> {
        let run_id = self.last_run_id + 1;
        self.shared.cancel_up_to(run_id - 1);
        self.send(Command::Invert {
            run_id,
            image,
            params,
        })?;
        self.last_run_id = run_id;
        Ok(run_id)
    }

    /// Starts a style set ([`Command::GenerateStyleSet`]), superseding (cancelling) any earlier
    /// run. Returns the new run id.
    pub fn generate_style_set(&mut self, params: StyleSetParams) -> Result<u64, SendCommandError> {
        let run_id = self.last_run_id + 1;
        self.shared.cancel_up_to(run_id - 1);
        self.send(Command::GenerateStyleSet { run_id, params })?;
        self.last_run_id = run_id;
        Ok(run_id)
    }

    /// Starts an appearance transfer ([`Command::AppearanceTransfer`]), superseding (cancelling)
    /// any earlier run; [`Self::cancel`] cancels it. Returns the request's run id.
    pub fn appearance_transfer(
        &mut self,
        params: AppearanceTransferParams,
    ) -> Result<u64, SendCommandError> {
        let run_id = self.last_run_id + 1;
        self.shared.cancel_up_to(run_id - 1);
        self.send(Command::AppearanceTransfer {
            run_id,
            params: Box::new(params),
        })?;
        self.last_run_id = run_id;
        Ok(run_id)
    }

    /// Cancels the running generation (and any queued one).
    pub fn cancel(&self) -> Result<(), SendCommandError> {
        self.shared.cancel_up_to(self.last_run_id);
        self.send(Command::Cancel)
    }

    /// Loads a model with its default products, cancelling any running generation first.
    pub fn load_model(&self, source: ModelSource) -> Result<(), SendCommandError> {
        self.load_model_with(source, Products::ModelDefault)
    }

    /// Loads a model whose UNet multiplies as `products` says, cancelling any running
    /// generation first.
    pub fn load_model_with(
        &self,
        source: ModelSource,
        products: Products,
    ) -> Result<(), SendCommandError> {
        self.shared.cancel_up_to(self.last_run_id);
        self.shared.load_cancel.store(false, Ordering::SeqCst);
        self.send(Command::LoadModel { source, products })
    }

    /// Stops the running model load before its next component; it ends with
    /// [`Event::ModelLoadFailed`] and the previous model stays.
    pub fn cancel_load(&self) {
        self.shared.load_cancel.store(true, Ordering::SeqCst);
    }

    /// The component the running model load is at (`None` when none runs); the UI is woken at
    /// each new stage.
    pub fn load_progress(&self) -> Option<ModelLoadProgress> {
        lock_ignoring_poison(&self.shared.load_progress).clone()
    }

    /// Sends any other command without blocking. Use [`Self::generate`], [`Self::cancel`] and
    /// [`Self::load_model`] for those three, so cancellation marks are set.
    pub fn send(&self, command: Command) -> Result<(), SendCommandError> {
        self.commands
            .try_send(command)
            .map_err(|error| match error {
                TrySendError::Full(_) => SendCommandError::Busy,
                TrySendError::Disconnected(_) => SendCommandError::Stopped,
            })
    }

    /// The next event, if one is waiting (never blocks).
    pub fn try_recv(&self) -> Option<Event> {
        self.events.try_recv().ok()
    }

    /// The event receiver, for callers that want to wait (tests, the headless CLI).
    pub fn events(&self) -> &Receiver<Event> {
        &self.events
    }

    /// Id of the latest run asked for (0 before the first).
    pub fn last_run_id(&self) -> u64 {
        self.last_run_id
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        self.shared.cancel_up_to(u64::MAX);
        // The thread also stops when the command channel closes; the explicit command is a courtesy.
        let _ = self.commands.try_send(Command::Shutdown);
    }
}

/// The worker's sending side: each event is followed by a wake-up call.
struct Outbox {
    events: Sender<Event>,
    shared: Arc<Shared>,
}

impl Outbox {
    fn emit(&self, event: Event) -> Result<(), Disconnected> {
        self.events.send(event).map_err(|_| Disconnected)?;
        self.shared.wake();
        Ok(())
    }
}

/// What the worker remembers across commands (and across a panic restart).
struct WorkerState {
    engine: Box<dyn Engine>,
    /// The last model that loaded successfully and its products, reloaded after a restart.
    loaded_model: Option<(ModelSource, Products)>,
    /// Commands taken off the channel during a run, to run after it.
    pending: VecDeque<Command>,
    /// The run being generated, if any (for reporting a panic).
    active_run: Option<u64>,
    /// The latest run whose maps the engine holds (finished or cancelled after some steps).
    latest_run: Option<u64>,
    /// The latest run that finished.
    latest_finished_run: Option<u64>,
}

fn worker_main(factory: &EngineFactory, commands: &Receiver<Command>, outbox: &Outbox) {
    let Ok(engine) = std::panic::catch_unwind(AssertUnwindSafe(|| factory())) else {
        let _ = outbox.emit(Event::Failed {
            run_id: None,
            message: "the engine could not be created (it panicked); the worker stopped".to_owned(),
        });
        return;
    };
    let mut state = WorkerState {
        engine,
        loaded_model: None,
        pending: VecDeque::new(),
        active_run: None,
        latest_run: None,
        latest_finished_run: None,
    };
    loop {
        let outcome =
            std::panic::catch_unwind(AssertUnwindSafe(|| serve(&mut state, commands, outbox)));
        let payload = match outcome {
            Ok(_stopped) => return,
            Err(payload) => payload,
        };
        let message = panic_message(payload.as_ref());
        outbox.shared.end_run();
        if let Some(run_id) = state.active_run.take() {
            let failed = Event::Failed {
                run_id: Some(run_id),
                message: format!("the worker panicked: {message}"),
            };
            if outbox.emit(failed).is_err() {
                return;
            }
        }
        if outbox.emit(Event::WorkerRestarted { message }).is_err() {
            return;
        }
        match std::panic::catch_unwind(AssertUnwindSafe(|| factory())) {
            Ok(engine) => state.engine = engine,
            Err(payload) => {
                let _ = outbox.emit(Event::Failed {
                    run_id: None,
                    message: format!(
                        "the engine could not be rebuilt ({}); the worker stopped",
                        panic_message(payload.as_ref())
                    ),
                });
                return;
            }
        }
        state.latest_run = None;
        state.latest_finished_run = None;
        if let Some((source, products)) = state.loaded_model.take() {
            if load_model(&mut state, source, products, outbox).is_err() {
                return;
            }
        }
    }
}

/// Runs commands until shutdown or disconnection.
fn serve(
    state: &mut WorkerState,
    commands: &Receiver<Command>,
    outbox: &Outbox,
) -> Result<(), Disconnected> {
    loop {
        let command = match state.pending.pop_front() {
            Some(command) => command,
            None => match commands.recv() {
                Ok(command) => command,
                Err(_) => return Ok(()),
            },
        };
        if let Some(run_id) = run_id_of(&command) {
            // A burst of edits (a slider being dragged) coalesces to its latest: every run that a
            // later queued run supersedes ends at once, without preparing anything.
            take_queued(state, commands, &outbox.shared);
            if state.pending.iter().any(|later| run_id_of(later).is_some()) {
                outbox.shared.cancel_up_to(run_id);
                outbox.emit(Event::Cancelled {
                    run_id,
                    steps_done: 0,
                })?;
                continue;
            }
        }
        match command {
            Command::Shutdown => return Ok(()),
            Command::LoadModel { source, products } => {
                load_model(state, source, products, outbox)?;
            }
            Command::Generate { run_id, params } => {
                run(
                    state,
                    run_id,
                    RunRequest::Generate(&params),
                    commands,
                    outbox,
                )?;
            }
            Command::GenerateEdit {
                run_id,
                params,
                spec,
            } => {
                let request = RunRequest::Edit(&params, spec.as_ref());
                run(state, run_id, request, commands, outbox)?;
            }
            Command::Invert {
                run_id,
                image,
                params,
            } => {
                let request = RunRequest::Invert(&image, &params);
                run(state, run_id, request, commands, outbox)?;
            }
            Command::GenerateStyleSet { run_id, params } => {
                run(
                    state,
                    run_id,
                    RunRequest::StyleSet(&params),
                    commands,
                    outbox,
                )?;
            }
            Command::SelectStyleImage { run_id, index } => {
                let result = if state.latest_run == Some(run_id) {
                    state.engine.select_style_image(index)
                } else {
                    Err(EngineError::Unavailable(
                        "that style set's maps are no longer held (only the latest run's are)"
                            .to_owned(),
                    ))
                };
                if let Err(error) = result {
                    outbox.emit(Event::Warning {
                        message: format!("Cannot show the maps of image {index}: {error}"),
                    })?;
                }
            }
            Command::AppearanceTransfer { run_id, params } => {
                let request = RunRequest::Appearance(&params);
                run(state, run_id, request, commands, outbox)?;
            }
            Command::Cancel => {}
            Command::RequestSelfAttention {
                run_id,
                grid_h,
                grid_w,
                span,
            } => {
                let event = if state.latest_run == Some(run_id) {
                    match state.engine.self_attention(grid_h, grid_w, span) {
                        Ok(map) => Event::SelfAttention { run_id, map },
                        Err(error) => Event::Failed {
                            run_id: None,
                            message: format!("self-attention {grid_h}x{grid_w}: {error}"),
                        },
                    }
                } else {
                    Event::SelfAttention { run_id, map: None }
                };
                outbox.emit(event)?;
            }
            Command::ExportAttention {
                run_id,
                path,
                word_heatmaps,
            } => {
                let result = if state.latest_finished_run == Some(run_id) {
                    state.engine.write_attention(&path, &word_heatmaps)
                } else {
                    Err(EngineError::Unavailable(
                        "the attention maps of that run are no longer held (only the latest finished run can be exported)"
                            .to_owned(),
                    ))
                };
                outbox.emit(export_event(path, result))?;
            }
            other @ (Command::ExportPngs { .. }
            | Command::ExportText { .. }
            | Command::ExportSegmentFiles { .. }) => {
                write_plain_export(other, outbox)?;
            }
            Command::Segment { run_id, request } => {
                let started_at = Instant::now();
                let result = if state.latest_finished_run == Some(run_id) {
                    state
                        .engine
                        .segment(&request)
                        .map_err(|error| error.to_string())
                } else {
                    Err("only the latest finished run can be segmented".to_owned())
                };
                outbox.emit(Event::Segmented {
                    run_id,
                    request,
                    result,
                    secs: started_at.elapsed().as_secs_f64(),
                })?;
            }
        }
    }
}

/// The run id of a command that starts a run (generate, edit, inversion).
fn run_id_of(command: &Command) -> Option<u64> {
    match command {
        Command::Generate { run_id, .. }
        | Command::GenerateEdit { run_id, .. }
        | Command::Invert { run_id, .. } => Some(*run_id),
        _ => None,
    }
}

/// Moves every command waiting in the channel to the back of `state.pending`, in order, without
/// blocking (a `Shutdown` among them cancels every run, as it does when taken during a run). A lost
/// handle is not an error here: the loop sees it at its next `recv`.
fn take_queued(state: &mut WorkerState, commands: &Receiver<Command>, shared: &Shared) {
    while let Ok(command) = commands.try_recv() {
        if matches!(command, Command::Shutdown) {
            shared.cancel_up_to(u64::MAX);
        }
        state.pending.push_back(command);
    }
}

/// Writes exports that need no engine (PNGs, text).
fn write_plain_export(command: Command, outbox: &Outbox) -> Result<(), Disconnected> {
    match command {
        Command::ExportPngs { files } => {
            for file in files {
                let result = write_png_file(&file.path, &file.image, file.parameters.as_deref());
                outbox.emit(export_event(file.path, result))?;
            }
        }
        Command::ExportText { path, text } => {
            let result = write_text_file(&path, &text);
            outbox.emit(export_event(path, result))?;
        }
        Command::ExportSegmentFiles { files } => {
            for file in files {
                let result = file.write();
                outbox.emit(export_event(file.path().to_path_buf(), result))?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// `Exported`, or `ExportFailed` with the error's message.
fn export_event(path: std::path::PathBuf, result: Result<(), impl std::fmt::Display>) -> Event {
    match result {
        Ok(()) => Event::Exported { path },
        Err(error) => Event::ExportFailed {
            path,
            message: error.to_string(),
        },
    }
}

/// Locks a mutex whose value a panic cannot leave half-written (plain data replaced whole).
fn lock_ignoring_poison<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn load_model(
    state: &mut WorkerState,
    source: ModelSource,
    products: Products,
    outbox: &Outbox,
) -> Result<(), Disconnected> {
    let shared = &outbox.shared;
    let mut progress = |stage: ModelLoadProgress| {
        if shared.load_cancel.load(Ordering::SeqCst) {
            return Err(EngineError::Cancelled);
        }
        *lock_ignoring_poison(&shared.load_progress) = Some(stage);
        shared.wake();
        Ok(())
    };
    let result = state
        .engine
        .load_model_observed(&source, products, &mut progress);
    *lock_ignoring_poison(&shared.load_progress) = None;
    match result {
        Err(error) if error.is_cancelled() => outbox.emit(Event::ModelLoadFailed {
            source,
            message: "loading cancelled; the previous model stays".to_owned(),
        }),
        Ok(info) => {
            state.loaded_model = Some((source, products));
            state.latest_run = None;
            state.latest_finished_run = None;
            outbox.emit(Event::ModelLoaded { info })
        }
        Err(error) => outbox.emit(Event::ModelLoadFailed {
            source,
            message: error.to_string(),
        }),
    }
}

/// What a run command asks the engine for.
#[derive(Clone, Copy)]
enum RunRequest<'a> {
    /// [`Command::Generate`].
    Generate(&'a GenerateParams),
    /// [`Command::GenerateEdit`].
    Edit(&'a GenerateParams, Option<&'a EditSpec>),
    /// [`Command::Invert`].
    Invert(&'a RgbImage, &'a InversionParams),
    /// [`Command::GenerateStyleSet`].
    StyleSet(&'a StyleSetParams),
    /// [`Command::AppearanceTransfer`].
    Appearance(&'a AppearanceTransferParams),
}

/// Runs a [`Command::Generate`] or [`Command::GenerateEdit`] under a fresh cancel token and reports
/// its end: the last branch's `Finished`, `Cancelled` or `Failed`. Only a lost event receiver is
/// returned.
fn run(
    state: &mut WorkerState,
    run_id: u64,
    request: RunRequest<'_>,
    commands: &Receiver<Command>,
    outbox: &Outbox,
) -> Result<(), Disconnected> {
    let cancel = outbox.shared.begin_run(run_id);
    if cancel.is_cancelled() {
        outbox.shared.end_run();
        return outbox.emit(Event::Cancelled {
            run_id,
            steps_done: 0,
        });
    }
    state.active_run = Some(run_id);
    let mut observer = WorkerObserver::new(run_id, commands, outbox, &mut state.pending);
    observer.adopt_pending()?;
    let result = match request {
        RunRequest::Generate(params) => state
            .engine
            .generate(params, &mut observer, &cancel)
            .map(RunEnd::Source),
        RunRequest::Edit(params, spec) => state
            .engine
            .generate_edit(params, spec, &mut observer, &cancel)
            .map(|output| RunEnd::Edit(output.edited, output.blend_mask)),
        RunRequest::Invert(image, params) => state
            .engine
            .invert(image, params, &mut observer, &cancel)
            .map(RunEnd::Inverted),
        RunRequest::StyleSet(params) => state
            .engine
            .generate_style_set(params, &mut observer, &cancel)
            .map(RunEnd::StyleSet),
        RunRequest::Appearance(params) => state
            .engine
            .appearance_transfer(params, &mut observer, &cancel)
            .map(|result| RunEnd::Appearance(Box::new(result))),
    };
    let WorkerObserver {
        source_started,
        source_steps,
        edited_steps,
        source_finished,
        branch_started_at,
        inversion_steps,
        appearance_steps,
        ..
    } = observer;
    state.active_run = None;
    outbox.shared.end_run();
    if source_started {
        // The engine's maps (probe, export, segments) are this run's source's now.
        let source_done =
            source_finished || matches!(result, Ok(RunEnd::Source(_)) | Ok(RunEnd::StyleSet(_)));
        state.latest_run = (source_steps > 0).then_some(run_id);
        state.latest_finished_run = source_done.then_some(run_id);
    }
    let elapsed_secs = branch_started_at.elapsed().as_secs_f64();
    match result {
        Ok(RunEnd::Source(output)) => outbox.emit(Event::Finished {
            run_id,
            branch: Branch::Source,
            image: output.image,
            elapsed_secs,
            self_attention_grids: output.self_attention_grids,
            blend_mask: None,
        }),
        Ok(RunEnd::Edit(Some(image), blend_mask)) => outbox.emit(Event::Finished {
            run_id,
            branch: Branch::Edited,
            image,
            elapsed_secs,
            self_attention_grids: Vec::new(),
            blend_mask,
        }),
        // Only the source was asked for; its `Finished` went out during the run.
        Ok(RunEnd::Edit(None, _)) if source_finished => Ok(()),
        Ok(RunEnd::Edit(None, _)) => outbox.emit(Event::Failed {
            run_id: Some(run_id),
            message: "the engine returned neither a source nor an edited image".to_owned(),
        }),
        Ok(RunEnd::Inverted(output)) => outbox.emit(Event::Inverted {
            run_id,
            source: output.source,
            reconstruction: output.reconstruction,
            psnr_db: output.psnr_db,
            seconds: elapsed_secs,
            cached: output.cached,
        }),
        Ok(RunEnd::StyleSet(output)) => {
            let grids = output.self_attention_grids.into_iter();
            for (index, (image, grids)) in output.images.into_iter().zip(grids).enumerate() {
                outbox.emit(Event::Finished {
                    run_id,
                    branch: Branch::StyleImage(index),
                    image,
                    elapsed_secs,
                    self_attention_grids: grids,
                    blend_mask: None,
                })?;
            }
            Ok(())
        }
        Ok(RunEnd::Appearance(result)) => outbox.emit(Event::Appearance {
            run_id,
            update: AppearanceUpdate::Finished(result),
        }),
        Err(EngineError::Disconnected(disconnected)) => Err(disconnected),
        Err(error) if error.is_cancelled() => outbox.emit(Event::Cancelled {
            run_id,
            steps_done: source_steps + edited_steps + inversion_steps + appearance_steps,
        }),
        Err(error) => outbox.emit(Event::Failed {
            run_id: Some(run_id),
            message: error.to_string(),
        }),
    }
}

/// How an engine's run ended well.
enum RunEnd {
    /// A plain run's output.
    Source(RunOutput),
    /// An edit run's edited image (none when only the source was asked for) and last blend mask.
    Edit(Option<RgbImage>, Option<BlendMask>),
    /// An inversion's result.
    Inverted(InversionOutput),
    /// A style set's images.
    StyleSet(StyleSetOutput),
    /// An appearance transfer's result.
    Appearance(Box<AppearanceResult>),
}

/// Forwards a run's progress as events and, between steps, takes commands off the channel.
struct WorkerObserver<'a> {
    run_id: u64,
    commands: &'a Receiver<Command>,
    outbox: &'a Outbox,
    pending: &'a mut VecDeque<Command>,
    /// The source branch started (the engine replaced its maps with this run's).
    source_started: bool,
    /// Steps of the source branch reported so far.
    source_steps: usize,
    /// Steps of the edited branch reported so far.
    edited_steps: usize,
    /// When the branch being reported started: the run (so the source's time includes preparing
    /// it), then the edited branch.
    branch_started_at: Instant,
    /// Edit runs: the source was recorded and reported `Finished`.
    source_finished: bool,
    /// The probe's latest request for this run, answered by the engine after the next step.
    self_attention_query: Option<SelfAttentionQuery>,
    /// Inversion steps reported so far (all phases).
    inversion_steps: usize,
    /// Appearance transfer steps reported so far.
    appearance_steps: usize,
}

impl<'a> WorkerObserver<'a> {
    fn new(
        run_id: u64,
        commands: &'a Receiver<Command>,
        outbox: &'a Outbox,
        pending: &'a mut VecDeque<Command>,
    ) -> Self {
        Self {
            run_id,
            commands,
            outbox,
            pending,
            source_started: false,
            source_steps: 0,
            edited_steps: 0,
            branch_started_at: Instant::now(),
            source_finished: false,
            self_attention_query: None,
            inversion_steps: 0,
            appearance_steps: 0,
        }
    }

    /// Treats the commands taken off the channel before the run started (see [`take_queued`]) as
    /// if they had come during it: plain exports run now, a probe request for this run is kept for
    /// the engine, the rest stay queued in order.
    fn adopt_pending(&mut self) -> Result<(), Disconnected> {
        let mut kept = VecDeque::with_capacity(self.pending.len());
        while let Some(command) = self.pending.pop_front() {
            match command {
                Command::Cancel => {}
                Command::RequestSelfAttention {
                    run_id,
                    grid_h,
                    grid_w,
                    span,
                } if run_id == self.run_id => {
                    self.self_attention_query = Some(SelfAttentionQuery {
                        grid_h,
                        grid_w,
                        span,
                    });
                }
                command @ (Command::ExportPngs { .. }
                | Command::ExportText { .. }
                | Command::ExportSegmentFiles { .. }) => {
                    write_plain_export(command, self.outbox)?;
                }
                other => kept.push_back(other),
            }
        }
        *self.pending = kept;
        Ok(())
    }

    /// Takes queued commands: plain exports run now, a probe request for this run is kept for the
    /// engine, the rest wait for the run's end (a `Shutdown` also cancels the run).
    fn drain_commands(&mut self) -> Result<(), Disconnected> {
        loop {
            match self.commands.try_recv() {
                // The handle tripped the run's token before sending it.
                Ok(Command::Cancel) => {}
                Ok(Command::RequestSelfAttention {
                    run_id,
                    grid_h,
                    grid_w,
                    span,
                }) if run_id == self.run_id => {
                    self.self_attention_query = Some(SelfAttentionQuery {
                        grid_h,
                        grid_w,
                        span,
                    });
                }
                Ok(
                    command @ (Command::ExportPngs { .. }
                    | Command::ExportText { .. }
                    | Command::ExportSegmentFiles { .. }),
                ) => write_plain_export(command, self.outbox)?,
                Ok(command) => {
                    if matches!(command, Command::Shutdown) {
                        self.outbox.shared.cancel_up_to(u64::MAX);
                    }
                    self.pending.push_back(command);
                }
                Err(TryRecvError::Empty) => return Ok(()),
                // The handle is gone, and with it the event receiver.
                Err(TryRecvError::Disconnected) => return Err(Disconnected),
            }
        }
    }
}

impl RunObserver for WorkerObserver<'_> {
    fn started(
        &mut self,
        branch: Branch,
        params: &GenerateParams,
        prompt: PromptInfo,
        edit: Option<EditInfo>,
    ) -> Result<(), Disconnected> {
        self.drain_commands()?;
        match branch {
            Branch::Source | Branch::StyleImage(_) => self.source_started = true,
            Branch::Edited => self.branch_started_at = Instant::now(),
        }
        self.outbox.emit(Event::Started {
            run_id: self.run_id,
            branch,
            params: params.clone(),
            prompt,
            edit,
        })
    }

    fn step(
        &mut self,
        branch: Branch,
        frame: StepFrame,
        blend_mask: Option<BlendMask>,
    ) -> Result<(), Disconnected> {
        match branch {
            // A style set's step counts once (its images step together).
            Branch::Source | Branch::StyleImage(0) => self.source_steps += 1,
            Branch::Edited => self.edited_steps += 1,
            Branch::StyleImage(_) => {}
        }
        self.outbox.emit(Event::Step {
            run_id: self.run_id,
            branch,
            frame: Box::new(frame),
            blend_mask,
        })?;
        self.drain_commands()
    }

    fn take_self_attention_query(&mut self) -> Option<SelfAttentionQuery> {
        self.self_attention_query.take()
    }

    fn self_attention(
        &mut self,
        _query: SelfAttentionQuery,
        map: Option<SelfAttentionMap>,
    ) -> Result<(), Disconnected> {
        self.outbox.emit(Event::SelfAttention {
            run_id: self.run_id,
            map,
        })
    }

    fn inversion_progress(
        &mut self,
        phase: &str,
        steps_done: usize,
        step_count: usize,
    ) -> Result<(), Disconnected> {
        self.inversion_steps += 1;
        self.outbox.emit(Event::InversionProgress {
            run_id: self.run_id,
            phase: phase.to_owned(),
            steps_done,
            step_count,
            elapsed_secs: self.branch_started_at.elapsed().as_secs_f64(),
        })?;
        self.drain_commands()
    }

    fn appearance(&mut self, update: AppearanceUpdate) -> Result<(), Disconnected> {
        if matches!(update, AppearanceUpdate::Step { .. }) {
            self.appearance_steps += 1;
        }
        self.outbox.emit(Event::Appearance {
            run_id: self.run_id,
            update,
        })?;
        self.drain_commands()
    }

    fn source_finished(&mut self, output: &RunOutput) -> Result<(), Disconnected> {
        self.source_finished = true;
        self.outbox.emit(Event::Finished {
            run_id: self.run_id,
            branch: Branch::Source,
            image: output.image.clone(),
            elapsed_secs: self.branch_started_at.elapsed().as_secs_f64(),
            self_attention_grids: output.self_attention_grids.clone(),
            blend_mask: None,
        })?;
        self.drain_commands()
    }
}

/// The text of a panic payload (`&str` or `String`), or a placeholder.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "unknown panic payload".to_owned()
    }
}
