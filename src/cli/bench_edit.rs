//! `attend bench edit`: how fast the editor answers, measured through the worker exactly as the
//! editor drives it (commands in, events out): the time from Generate to the first heat map and to
//! the finished image, recording an edit's source, and, for a word-weight slider, the time from
//! releasing it to the first preview and to the finished edit (the weight's window from the first
//! step, and opening later so the first steps are the source's), and from the last position of a
//! drag (a burst of edits, each superseding the one before) to its finished edit.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use attend::worker::{
    pipeline_engine_factory, Branch, CrossWindow, EditSpec, Event, GenerateParams, ModelSource,
    Reweight, StepWindow, WorkerHandle,
};

use super::checks::at_least_one;

/// How long the bench waits for the next event before it gives up.
const EVENT_TIMEOUT: Duration = Duration::from_secs(600);

/// Arguments of `attend bench edit`.
#[derive(Debug, clap::Args)]
pub struct EditBenchArgs {
    /// Model folder (default: the bundled model).
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// The source prompt.
    #[arg(long, default_value = "a red circle and a blue square")]
    pub prompt: String,
    /// The word whose weight the slider sets.
    #[arg(long, default_value = "blue")]
    pub word: String,
    /// Denoising steps (default: the editor's).
    #[arg(long, value_parser = at_least_one, allow_negative_numbers = true)]
    pub steps: Option<usize>,
    /// Where the weight's cross-attention window opens in the window-slider case (fraction of the
    /// run); the steps before it are copied from the source.
    #[arg(long, default_value_t = 0.5)]
    pub window_start: f64,
    /// Rounds (round `r` uses seed `r`); the medians are reported.
    #[arg(long, default_value_t = 3, value_parser = at_least_one, allow_negative_numbers = true)]
    pub rounds: usize,
    /// Slider positions sent in the drag (each an edit superseding the one before).
    #[arg(long, default_value_t = 10, value_parser = at_least_one, allow_negative_numbers = true)]
    pub drag_edits: usize,
    /// Milliseconds between two positions of the drag.
    #[arg(long, default_value_t = 30)]
    pub drag_interval_ms: u64,
    /// Print one JSON line instead of text.
    #[arg(long)]
    pub json: bool,
}

/// One round's measurements, in seconds.
#[derive(Clone, Debug, Default, serde::Serialize)]
struct Round {
    /// Generate sent -> its first step (the first heat map).
    generate_first_heatmap: f64,
    /// Generate sent -> its image.
    generate_finished: f64,
    /// Recording the edit's source: sent -> the source's image.
    source_recorded: f64,
    /// Weight slider released (window from the first step): sent -> first edited step.
    release_first_preview: f64,
    /// ... -> the finished edit.
    release_finished: f64,
    /// Weight slider released, window opening at `--window-start`: sent -> first edited step.
    window_first_preview: f64,
    /// ... -> the finished edit.
    window_finished: f64,
    /// Edited steps of the window case that ran no UNet (copied from the source).
    window_reused_steps: usize,
    /// Last position of a drag sent -> its finished edit.
    drag_finished: f64,
    /// Drag edits that ended cancelled (all but the last, when every one is superseded).
    drag_cancelled: usize,
}

/// What a timed request saw.
struct Timed {
    first_step: f64,
    finished: f64,
    reused_steps: usize,
}

/// Run `attend bench edit`.
pub fn bench_edit(args: &EditBenchArgs) -> anyhow::Result<()> {
    if !(0.0..=1.0).contains(&args.window_start) {
        bail!(
            "--window-start {} is not a fraction of the run (0 to 1)",
            args.window_start
        );
    }
    let load_before = load_averages();
    let mut worker =
        WorkerHandle::spawn(pipeline_engine_factory()).context("starting the worker thread")?;
    let source = match &args.model {
        Some(dir) => ModelSource::Folder(dir.clone()),
        None => ModelSource::Bundled,
    };
    worker
        .load_model(source)
        .context("sending the model load to the worker")?;
    let model_name = loop {
        match next_event(&worker)? {
            Event::ModelLoaded { info } => break info.name,
            Event::ModelLoadFailed { message, .. } => bail!("the model did not load: {message}"),
            _ => {}
        }
    };
    let defaults = GenerateParams::default();
    let steps = args.steps.unwrap_or(defaults.steps);
    // One untimed run warms the caches and the thread pools.
    let warm_up = worker.generate(params(args, steps, 1000))?;
    wait_for(&worker, warm_up, Branch::Source)?;

    let mut rounds = Vec::with_capacity(args.rounds);
    for round in 0..args.rounds {
        let seed = round as u64;
        let mut measured = Round::default();

        let sent = Instant::now();
        let run_id = worker.generate(params(args, steps, seed))?;
        let timed = wait_for_timed(&worker, run_id, Branch::Source, sent)?;
        measured.generate_first_heatmap = timed.first_step;
        measured.generate_finished = timed.finished;

        let sent = Instant::now();
        let run_id = worker.generate_edit(params(args, steps, seed), None)?;
        measured.source_recorded = wait_for_timed(&worker, run_id, Branch::Source, sent)?.finished;

        let sent = Instant::now();
        let run_id =
            worker.generate_edit(params(args, steps, seed), Some(reweight(args, 2.0, 0.0)))?;
        let timed = wait_for_timed(&worker, run_id, Branch::Edited, sent)?;
        measured.release_first_preview = timed.first_step;
        measured.release_finished = timed.finished;

        let sent = Instant::now();
        let spec = reweight(args, 2.0, args.window_start);
        let run_id = worker.generate_edit(params(args, steps, seed), Some(spec))?;
        let timed = wait_for_timed(&worker, run_id, Branch::Edited, sent)?;
        measured.window_first_preview = timed.first_step;
        measured.window_finished = timed.finished;
        measured.window_reused_steps = timed.reused_steps;

        let mut drag_runs = Vec::with_capacity(args.drag_edits);
        let mut last_sent = Instant::now();
        for position in 0..args.drag_edits {
            if position > 0 {
                std::thread::sleep(Duration::from_millis(args.drag_interval_ms));
            }
            let scale = 1.0 + (position + 1) as f32 / args.drag_edits as f32;
            last_sent = Instant::now();
            let spec = reweight(args, scale, 0.0);
            drag_runs.push(worker.generate_edit(params(args, steps, seed), Some(spec))?);
        }
        let last_run = drag_runs.last().copied().unwrap_or_default();
        let mut cancelled = 0;
        loop {
            let event = next_event(&worker)?;
            match event {
                Event::Cancelled { run_id, .. } if drag_runs.contains(&run_id) => cancelled += 1,
                Event::Finished {
                    run_id,
                    branch: Branch::Edited,
                    ..
                } if run_id == last_run => break,
                Event::Failed {
                    run_id: Some(run_id),
                    message,
                } if drag_runs.contains(&run_id) => bail!("a drag edit failed: {message}"),
                _ => {}
            }
        }
        measured.drag_finished = last_sent.elapsed().as_secs_f64();
        measured.drag_cancelled = cancelled;
        rounds.push(measured);
    }
    let load_after = load_averages();
    report(args, &model_name, steps, &rounds, &load_before, &load_after)
}

/// The source run's parameters.
fn params(args: &EditBenchArgs, steps: usize, seed: u64) -> GenerateParams {
    GenerateParams {
        prompt: args.prompt.clone(),
        steps,
        seed,
        ..GenerateParams::default()
    }
}

/// The slider's edit: `--word` weighted by `scale`, its window opening at `window_start`.
fn reweight(args: &EditBenchArgs, scale: f32, window_start: f64) -> EditSpec {
    let default = EditSpec::new(args.prompt.clone());
    EditSpec {
        cross_window: CrossWindow::uniform(StepWindow::new(
            window_start,
            default.cross_window.default.end,
        )),
        reweights: vec![Reweight {
            word: args.word.clone(),
            scale,
        }],
        ..default
    }
}

fn next_event(worker: &WorkerHandle) -> anyhow::Result<Event> {
    worker
        .events()
        .recv_timeout(EVENT_TIMEOUT)
        .context("no event from the worker within 10 minutes")
}

/// Waits for run `run_id`'s `branch` to finish.
fn wait_for(worker: &WorkerHandle, run_id: u64, branch: Branch) -> anyhow::Result<()> {
    wait_for_timed(worker, run_id, branch, Instant::now()).map(|_| ())
}

/// Waits for run `run_id`'s `branch` to finish; times its first step and its end from `sent`.
fn wait_for_timed(
    worker: &WorkerHandle,
    run_id: u64,
    branch: Branch,
    sent: Instant,
) -> anyhow::Result<Timed> {
    let mut first_step = None;
    let mut reused_steps = 0;
    loop {
        let event = next_event(worker)?;
        if event.run_id() != Some(run_id) {
            continue;
        }
        match event {
            Event::Step {
                branch: step_branch,
                frame,
                ..
            } if step_branch == branch => {
                first_step.get_or_insert_with(|| sent.elapsed().as_secs_f64());
                // A copied step takes no UNet call: well under a millisecond.
                if branch == Branch::Edited && frame.timing.step_secs < 1e-3 {
                    reused_steps += 1;
                }
            }
            Event::Finished {
                branch: finished, ..
            } if finished == branch => {
                let finished = sent.elapsed().as_secs_f64();
                return Ok(Timed {
                    first_step: first_step.unwrap_or(finished),
                    finished,
                    reused_steps,
                });
            }
            Event::Cancelled { steps_done, .. } => {
                bail!("run {run_id} was cancelled after {steps_done} steps")
            }
            Event::Failed { message, .. } => bail!("run {run_id} failed: {message}"),
            _ => {}
        }
    }
}

/// The 1, 5 and 15 minute load averages (`/proc/loadavg`), or why not.
fn load_averages() -> String {
    match std::fs::read_to_string("/proc/loadavg") {
        Ok(text) => text
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        Err(error) => format!("unknown (/proc/loadavg: {error})"),
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

fn report(
    args: &EditBenchArgs,
    model_name: &str,
    steps: usize,
    rounds: &[Round],
    load_before: &str,
    load_after: &str,
) -> anyhow::Result<()> {
    type Measure = (&'static str, fn(&Round) -> f64);
    let measures: [Measure; 9] = [
        ("generate_first_heatmap_s", |r| r.generate_first_heatmap),
        ("generate_finished_s", |r| r.generate_finished),
        ("source_recorded_s", |r| r.source_recorded),
        ("release_first_preview_s", |r| r.release_first_preview),
        ("release_finished_s", |r| r.release_finished),
        ("window_first_preview_s", |r| r.window_first_preview),
        ("window_finished_s", |r| r.window_finished),
        ("drag_finished_s", |r| r.drag_finished),
        ("window_reused_steps", |r| r.window_reused_steps as f64),
    ];
    let medians: Vec<(&str, f64)> = measures
        .iter()
        .map(|(name, value)| (*name, median(rounds.iter().map(value).collect())))
        .collect();
    let drag_cancelled: Vec<usize> = rounds.iter().map(|round| round.drag_cancelled).collect();
    if args.json {
        let mut object = serde_json::Map::new();
        object.insert("model".into(), model_name.into());
        object.insert("steps".into(), steps.into());
        object.insert("rounds".into(), rounds.len().into());
        object.insert("window_start".into(), args.window_start.into());
        object.insert("drag_edits".into(), args.drag_edits.into());
        object.insert("load_before".into(), load_before.into());
        object.insert("load_after".into(), load_after.into());
        for (name, value) in &medians {
            object.insert((*name).into(), (*value).into());
        }
        object.insert(
            "drag_cancelled".into(),
            serde_json::to_value(&drag_cancelled)?,
        );
        object.insert("per_round".into(), serde_json::to_value(rounds)?);
        println!("{}", serde_json::Value::Object(object));
        return Ok(());
    }
    println!(
        "{model_name}: {steps} steps, {} rounds (medians), prompt {:?}, slider on {:?}",
        rounds.len(),
        args.prompt,
        args.word
    );
    println!("load averages (1/5/15 min): before {load_before}, after {load_after}");
    let label = |name: &str| match name {
        "generate_first_heatmap_s" => "Generate -> first heat map".to_owned(),
        "generate_finished_s" => format!("Generate -> image ({steps} steps)"),
        "source_recorded_s" => "record the edit's source".to_owned(),
        "release_first_preview_s" => "slider released -> first preview".to_owned(),
        "release_finished_s" => "slider released -> finished edit".to_owned(),
        "window_first_preview_s" => format!(
            "window from {:.2}: released -> first preview",
            args.window_start
        ),
        "window_finished_s" => format!(
            "window from {:.2}: released -> finished edit",
            args.window_start
        ),
        "drag_finished_s" => format!(
            "drag of {} positions: last -> finished edit",
            args.drag_edits
        ),
        _ => "window case: steps copied from the source".to_owned(),
    };
    for (name, value) in &medians {
        if name.ends_with("_s") {
            println!("  {:<48} {value:>7.3} s", label(name));
        } else {
            println!("  {:<48} {value:>7.0}", label(name));
        }
    }
    println!(
        "  drag edits cancelled per round (superseded): {drag_cancelled:?} of {}",
        args.drag_edits
    );
    Ok(())
}
