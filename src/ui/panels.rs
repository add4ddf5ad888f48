//! The panels around the canvas, as views that read the [`ViewContext`] and ask for changes with
//! [`UiCommand`]s: the menu bar, the generation controls (left), the canvas view switch, view
//! settings, aggregation, probe and export buttons (right), and progress, timeline and status line
//! (bottom).

use egui::RichText;

use crate::analysis::colormap::Colormap;
use crate::analysis::heatmap::SelfAttentionSpan;
use crate::ui::checks::params_problems;
use crate::ui::command::{UiCommand, UiCommands};
use crate::ui::context::ViewContext;
use crate::ui::dialogs::DialogPurpose;
use crate::ui::models_menu::ModelsMenu;
use crate::ui::run_view::{RunOutcome, RunView};
use crate::ui::state::{AppState, CanvasView, StatusLevel, StatusMessage};
use crate::worker::{ModelSource, Products};

/// File and Export menus.
pub(crate) fn menu_bar_ui(
    ctx: &ViewContext<'_>,
    ui: &mut egui::Ui,
    commands: &mut UiCommands,
    models_menu: &mut ModelsMenu,
) {
    egui::Panel::top("attend.menu").show(ui, |ui| {
        egui::MenuBar::new().ui(ui, |ui| {
            ui.menu_button("File", |ui| {
                if ui.button("Open model folder...").clicked() {
                    commands.push(UiCommand::OpenDialog(DialogPurpose::OpenModelFolder));
                }
                if ui.button("Use bundled model").clicked() {
                    commands.push(UiCommand::LoadModel(ModelSource::Bundled));
                }
                ui.separator();
                if ui.button("Open image...").clicked() {
                    commands.push(UiCommand::OpenDialog(DialogPurpose::OpenImage));
                }
                if ui.button("Open session...").clicked() {
                    commands.push(UiCommand::OpenDialog(DialogPurpose::OpenSession));
                }
                if ui.button("Save session...").clicked() {
                    commands.push(UiCommand::OpenDialog(DialogPurpose::SaveSession));
                }
                ui.separator();
                if ui.button("Quit").clicked() {
                    ui.ctx().send_viewport_cmd(egui::ViewportCommand::Close);
                }
            });
            let loaded = ctx.state.model.loaded.as_ref().map(|info| &info.source);
            models_menu.menu_ui(ui, loaded, commands);
            ui.menu_button("Export", |ui| export_buttons_ui(ctx, ui, commands));
            models_menu.load_progress_ui(ui, commands);
        });
    });
}

/// The export actions (menu and right panel).
fn export_buttons_ui(ctx: &ViewContext<'_>, ui: &mut egui::Ui, commands: &mut UiCommands) {
    let run = ctx.state.run.as_ref();
    let has_image = run.is_some_and(|run| !run.steps.is_empty());
    let has_heatmap = has_image && ctx.heat_shown;
    let finished = ctx.state.run_finished();
    for (label, purpose, enabled) in [
        ("Export image...", DialogPurpose::ExportImage, has_image),
        (
            "Export heat map over image...",
            DialogPurpose::ExportHeatmapOverImage,
            has_heatmap,
        ),
        (
            "Export heat map alone...",
            DialogPurpose::ExportHeatmapAlone,
            has_heatmap,
        ),
        (
            "Export all word heat maps...",
            DialogPurpose::ExportAllHeatmaps,
            has_image,
        ),
        (
            "Export attention maps...",
            DialogPurpose::ExportAttention,
            finished,
        ),
    ] {
        let enabled = enabled && !ctx.dialog_open;
        if ui.add_enabled(enabled, egui::Button::new(label)).clicked() {
            commands.push(UiCommand::OpenDialog(purpose));
        }
    }
}

/// The matrix products choice (a model is loaded again when it changes), showing what the loaded
/// model multiplies with; bf16 is offered only where the CPU runs it.
fn products_ui(ctx: &ViewContext<'_>, ui: &mut egui::Ui, commands: &mut UiCommands) {
    let chosen = ctx.state.settings.products;
    let loaded = ctx.state.model.loaded.as_ref();
    let bf16_available = loaded.is_none_or(|info| info.bf16_products_available);
    let choices = [
        (
            Products::ModelDefault,
            "Model default",
            "bf16 for the bundled model (its accuracy measured to hold), f32 for any other model",
        ),
        (
            Products::F32,
            "f32 (exact)",
            "f32 operands: images and maps within 1e-4 of diffusers",
        ),
        (
            Products::Bf16,
            "bf16 (fast)",
            "operands rounded to bf16, sums in f32: about twice as fast on SD 1.5; images and maps \
             differ from f32 by a fraction of a percent",
        ),
    ];
    let selected = match loaded {
        Some(info) => {
            let in_use = if info.bf16_products { "bf16" } else { "f32" };
            if chosen == Products::ModelDefault {
                format!("{in_use} (model default)")
            } else {
                in_use.to_owned()
            }
        }
        None => choices
            .iter()
            .find(|(choice, ..)| *choice == chosen)
            .map_or(String::new(), |(_, label, _)| (*label).to_owned()),
    };
    egui::ComboBox::from_label("Products")
        .selected_text(selected)
        .show_ui(ui, |ui| {
            for (choice, label, hint) in choices {
                let enabled = choice != Products::Bf16 || bf16_available;
                let button = egui::Button::selectable(choice == chosen, label);
                let response = ui
                    .add_enabled(enabled, button)
                    .on_hover_text(hint)
                    .on_disabled_hover_text("This CPU has no AVX-512 BF16: products stay f32");
                if response.clicked() {
                    commands.push(UiCommand::SetProducts(choice));
                }
            }
        })
        .response
        .on_hover_text("How the UNet's matrix products treat their operands");
}

/// Model, prompts and generation parameters (the top of the left panel).
pub(crate) fn controls_ui(ctx: &ViewContext<'_>, ui: &mut egui::Ui, commands: &mut UiCommands) {
    let state = ctx.state;
    ui.heading("Model");
    let model_text = match (&state.model.loading, &state.model.loaded) {
        (Some(source), _) => format!("loading {source}..."),
        (None, Some(info)) => info.name.clone(),
        (None, None) => "none".to_owned(),
    };
    ui.horizontal_wrapped(|ui| {
        ui.label(model_text);
        products_ui(ctx, ui, commands);
    });
    ui.horizontal(|ui| {
        if ui.button("Open model folder...").clicked() {
            commands.push(UiCommand::OpenDialog(DialogPurpose::OpenModelFolder));
        }
        if ui.button("Open file...").clicked() {
            commands.push(UiCommand::OpenDialog(DialogPurpose::OpenModelFile));
        }
        if ui.button("Bundled model").clicked() {
            commands.push(UiCommand::LoadModel(ModelSource::Bundled));
        }
    });
    ui.separator();

    let mut params_copy = state.settings.params.clone();
    let params = &mut params_copy;
    // With a real image open, the prompt describes it (the prompt it is inverted with).
    let (prompt_label, prompt_hint) = if state.image.is_open() {
        (
            "Describe the image",
            "what the image shows, e.g. a red circle",
        )
    } else {
        ("Prompt", "a red circle and a blue square")
    };
    let label = ui.label(prompt_label);
    ui.add(
        egui::TextEdit::multiline(&mut params.prompt)
            .desired_rows(3)
            .desired_width(f32::INFINITY)
            .hint_text(prompt_hint),
    )
    .labelled_by(label.id);
    let label = ui.label("Negative prompt");
    ui.add(
        egui::TextEdit::multiline(&mut params.negative_prompt)
            .desired_rows(2)
            .desired_width(f32::INFINITY),
    )
    .labelled_by(label.id);

    egui::Grid::new("attend.params")
        .num_columns(2)
        .show(ui, |ui| {
            let label = ui.label("Seed");
            ui.horizontal(|ui| {
                ui.add(egui::DragValue::new(&mut params.seed).speed(1.0))
                    .labelled_by(label.id);
                if ui.button("Random seed").clicked() {
                    params.seed = random_seed();
                }
            });
            ui.end_row();

            // No range on these fields: a value out of range is shown, not clamped.
            let label = ui.label("Steps");
            ui.add(egui::DragValue::new(&mut params.steps).clamp_existing_to_range(false))
                .labelled_by(label.id);
            ui.end_row();

            let label = ui.label("Guidance");
            ui.add(
                egui::DragValue::new(&mut params.guidance)
                    // (egui would turn a NaN into infinity)
                    .clamp_existing_to_range(false)
                    .speed(0.1)
                    .fixed_decimals(1),
            )
            .labelled_by(label.id);
            ui.end_row();

            let label = ui.label("Scheduler");
            let model = state.model.loaded.as_ref();
            let default_name = model.map_or_else(
                || "model default".to_owned(),
                |info| format!("model default ({})", info.default_scheduler),
            );
            let selected_text = params
                .scheduler
                .clone()
                .unwrap_or_else(|| default_name.clone());
            egui::ComboBox::from_id_salt("attend.scheduler")
                .selected_text(selected_text)
                .show_ui(ui, |ui| {
                    ui.selectable_value(&mut params.scheduler, None, default_name);
                    for name in model
                        .map(|info| info.schedulers.clone())
                        .unwrap_or_default()
                    {
                        ui.selectable_value(&mut params.scheduler, Some(name.clone()), name);
                    }
                })
                .response
                .labelled_by(label.id);
            ui.end_row();

            let label = ui.label("Size");
            let (default_width, default_height, multiple) = model.map_or((64, 64, 8), |info| {
                (
                    info.default_width_px,
                    info.default_height_px,
                    info.size_multiple_px.max(1),
                )
            });
            ui.horizontal(|ui| {
                let mut width = params.width_px.unwrap_or(default_width);
                let mut height = params.height_px.unwrap_or(default_height);
                // No range: a typed size the model cannot take is shown, not changed (dragging
                // moves in whole multiples).
                let width_response = ui
                    .add(
                        egui::DragValue::new(&mut width)
                            .clamp_existing_to_range(false)
                            .speed(multiple as f64),
                    )
                    .labelled_by(label.id)
                    .on_hover_text("Width in pixels");
                ui.label("x");
                let height_response = ui
                    .add(
                        egui::DragValue::new(&mut height)
                            .clamp_existing_to_range(false)
                            .speed(multiple as f64),
                    )
                    .on_hover_text("Height in pixels");
                let round = |value: usize| (value / multiple * multiple).max(multiple);
                if width_response.dragged() {
                    width = round(width);
                }
                if height_response.dragged() {
                    height = round(height);
                }
                if width_response.changed() || height_response.changed() {
                    params.width_px = Some(width);
                    params.height_px = Some(height);
                }
                if ui
                    .add_enabled(
                        params.width_px.is_some() || params.height_px.is_some(),
                        egui::Button::new("Default"),
                    )
                    .on_hover_text("Use the model's default size")
                    .clicked()
                {
                    params.width_px = None;
                    params.height_px = None;
                }
            });
            ui.end_row();
        });
    // Under the fields, the whole panel wide: a value out of range is shown, never clamped.
    let size_multiple = state
        .model
        .loaded
        .as_ref()
        .map_or(8, |info| info.size_multiple_px);
    for problem in params_problems(params, size_multiple) {
        ui.add(egui::Label::new(RichText::new(problem).color(ui.visuals().error_fg_color)).wrap());
    }
    ui.separator();
    ui.horizontal(|ui| {
        let generate = ui
            .add(egui::Button::new(RichText::new("Generate").strong()))
            .on_hover_text("Ctrl+Enter");
        if generate.clicked() {
            commands.push(UiCommand::Generate);
        }
        if ui
            .add_enabled(state.is_generating(), egui::Button::new("Cancel"))
            .clicked()
        {
            commands.push(UiCommand::Cancel);
        }
    });
    if params_copy != state.settings.params {
        // Before Generate, which then runs with the new parameters.
        commands.push_first(UiCommand::SetParams(params_copy));
    }
}

/// The switch between the word heat map, the probe and the segments (top of the right panel).
pub(crate) fn canvas_view_switch_ui(
    ctx: &ViewContext<'_>,
    ui: &mut egui::Ui,
    commands: &mut UiCommands,
) {
    let current = ctx.state.canvas_view;
    ui.horizontal(|ui| {
        for (view, label) in [
            (CanvasView::WordHeatmap, "Heat map"),
            (CanvasView::Probe, "Probe"),
            (CanvasView::Segments, "Segments"),
        ] {
            if ui.selectable_label(current == view, label).clicked() {
                commands.push(UiCommand::SetCanvasView(view));
            }
        }
    });
}

/// View settings, aggregation, probe and export (the right panel outside the Segments view).
pub(crate) fn view_panel_ui(ctx: &ViewContext<'_>, ui: &mut egui::Ui, commands: &mut UiCommands) {
    ui.heading("View");
    let mut view = ctx.state.settings.view.clone();
    egui::ComboBox::from_label("Colormap")
        .selected_text(view.colormap.name())
        .show_ui(ui, |ui| {
            for colormap in Colormap::ALL {
                ui.selectable_value(&mut view.colormap, colormap, colormap.name());
            }
        });
    ui.add(egui::Slider::new(&mut view.opacity, 0.0..=1.0).text("Opacity"));
    ui.add(egui::Slider::new(&mut view.threshold, 0.0..=1.0).text("Threshold"));
    ui.checkbox(&mut view.show_image, "Show image");
    ui.checkbox(&mut view.show_heatmap, "Show heat map");
    ui.checkbox(&mut view.smooth_image, "Smooth image");
    if view != ctx.state.settings.view {
        commands.push(UiCommand::SetView(view));
    }
    if ui.button("Reset zoom").clicked() {
        commands.push(UiCommand::ResetZoom);
    }
    ui.separator();
    aggregation_ui(ctx, ui, commands);
    ui.separator();
    probe_ui(ctx, ui, commands);
    ui.separator();
    ui.heading("Export");
    export_buttons_ui(ctx, ui, commands);
}

/// Resolutions, places, step window.
fn aggregation_ui(ctx: &ViewContext<'_>, ui: &mut egui::Ui, commands: &mut UiCommands) {
    ui.heading("Aggregation");
    let run = ctx.state.run.as_ref();
    let grids = run.map(RunView::cross_grids).unwrap_or_default();
    let largest = grids.first().copied().unwrap_or((0, 0));
    let mut aggregation = ctx.state.settings.aggregation.clone();
    ui.label("Resolutions");
    ui.horizontal_wrapped(|ui| {
        for &(h, w) in &grids {
            // DAAM's default skips grids 8 times smaller than the largest one.
            let in_default = h * 8 > largest.0 && w * 8 > largest.1;
            let mut chosen = aggregation
                .resolutions
                .as_ref()
                .map_or(in_default, |set| set.contains(&(h, w)));
            if ui.checkbox(&mut chosen, format!("{h}x{w}")).changed() {
                let mut set = aggregation.resolutions.clone().unwrap_or_else(|| {
                    grids
                        .iter()
                        .copied()
                        .filter(|&(gh, gw)| gh * 8 > largest.0 && gw * 8 > largest.1)
                        .collect()
                });
                if chosen {
                    set.insert((h, w));
                } else {
                    set.remove(&(h, w));
                }
                aggregation.resolutions = Some(set);
            }
        }
        if grids.is_empty() {
            ui.weak("(after the first step)");
        }
    });
    if aggregation.resolutions.is_some() && ui.button("DAAM default resolutions").clicked() {
        aggregation.resolutions = None;
    }
    ui.horizontal(|ui| {
        ui.label("Places");
        ui.checkbox(&mut aggregation.down, "Down");
        ui.checkbox(&mut aggregation.mid, "Mid");
        ui.checkbox(&mut aggregation.up, "Up");
    });
    let step_count = run.map_or(1, |run| run.step_count.max(1));
    let last_index = step_count - 1;
    let mut first = aggregation.first_step.min(last_index);
    let mut last = aggregation.last_step.unwrap_or(last_index).min(last_index);
    let first_changed = ui
        .add(egui::Slider::new(&mut first, 0..=last_index).text("First step"))
        .changed();
    let last_changed = ui
        .add(egui::Slider::new(&mut last, 0..=last_index).text("Last step"))
        .changed();
    if first_changed {
        aggregation.first_step = first;
    }
    if last_changed {
        aggregation.last_step = (last < last_index).then_some(last);
    }
    if aggregation.first_step > last {
        aggregation.first_step = last;
    }
    ui.checkbox(
        &mut aggregation.normalize_tokens,
        "Normalise over words (DAAM)",
    );
    if aggregation != ctx.state.settings.aggregation {
        commands.push(UiCommand::SetAggregation(aggregation));
    }
}

/// Self-attention probe.
fn probe_ui(ctx: &ViewContext<'_>, ui: &mut egui::Ui, commands: &mut UiCommands) {
    let state = ctx.state;
    ui.heading("Self-attention probe");
    let mut probing = state.canvas_view == CanvasView::Probe;
    if ui.checkbox(&mut probing, "Probe self-attention").changed() {
        commands.push(UiCommand::SetCanvasView(if probing {
            CanvasView::Probe
        } else {
            CanvasView::WordHeatmap
        }));
    }
    if !probing {
        return;
    }
    let grids = state
        .run
        .as_ref()
        .map(RunView::probe_grids)
        .unwrap_or_default();
    let Some(&first_grid) = grids.first() else {
        ui.weak("Available once a run has made its first step.");
        return;
    };
    let current = state
        .probe
        .grid
        .filter(|grid| grids.contains(grid))
        .unwrap_or(first_grid);
    let mut chosen = current;
    egui::ComboBox::from_label("Probe resolution")
        .selected_text(format!("{}x{}", current.0, current.1))
        .show_ui(ui, |ui| {
            for grid in &grids {
                ui.selectable_value(&mut chosen, *grid, format!("{}x{}", grid.0, grid.1));
            }
        });
    if state.probe.grid != Some(chosen) {
        commands.push(UiCommand::SetProbeGrid(chosen));
    }
    let mut span = state.settings.probe_span;
    ui.horizontal(|ui| {
        ui.radio_value(&mut span, SelfAttentionSpan::LatestStep, "Last step");
        ui.radio_value(&mut span, SelfAttentionSpan::MeanOverSteps, "All steps");
    });
    if span != state.settings.probe_span {
        commands.push(UiCommand::SetProbeSpan(span));
    }
    ui.weak("Click the canvas (or hold Shift and hover) to see where a pixel attends.");
}

/// The progress bar: a running source first, else the run the heat maps show (the edited one in
/// edit mode).
pub(crate) fn progress_ui(ctx: &ViewContext<'_>, ui: &mut egui::Ui) {
    let (fraction, text) = progress(ctx.state);
    ui.add(
        egui::ProgressBar::new(fraction)
            .text(text)
            .desired_width(ui.available_width()),
    );
}

/// The progress bar's fraction and text: "cancelling..." from the moment Cancel is clicked until
/// the run ends.
pub(crate) fn progress(state: &AppState) -> (f32, String) {
    let progress_run = state
        .run
        .as_ref()
        .filter(|run| run.is_running())
        .or(state.shown_run());
    let cancelling = state.cancel_requested && state.is_generating();
    match (progress_run, state.pending_run) {
        (run, Some(_)) if cancelling => (
            run.map_or(0.0, |run| {
                run.steps.len() as f32 / run.step_count.max(1) as f32
            }),
            "cancelling...".to_owned(),
        ),
        (_, Some(_)) => (0.0, "starting...".to_owned()),
        (None, None) => (0.0, "idle".to_owned()),
        (Some(run), None) => {
            let done = run.steps.len();
            let fraction = done as f32 / run.step_count.max(1) as f32;
            let speed = run
                .secs_per_step()
                .map_or_else(String::new, |secs| format!(", {secs:.2} s/step"));
            let text = match &run.outcome {
                RunOutcome::Running if cancelling => {
                    format!("cancelling... (step {done}/{})", run.step_count)
                }
                RunOutcome::Running => {
                    let eta = run
                        .eta_secs()
                        .map_or_else(String::new, |secs| format!(", ETA {secs:.1} s"));
                    format!("step {done}/{}{speed}{eta}", run.step_count)
                }
                RunOutcome::Finished { elapsed_secs } => {
                    format!(
                        "done: {done}/{} steps in {elapsed_secs:.1} s{speed}",
                        run.step_count
                    )
                }
                RunOutcome::Cancelled { steps_done } => {
                    format!("cancelled after {steps_done}/{} steps", run.step_count)
                }
                RunOutcome::Failed(_) => {
                    format!("failed after {done}/{} steps", run.step_count)
                }
            };
            (fraction, text)
        }
    }
}

/// The timeline: follow the latest step, or scrub to an earlier one.
pub(crate) fn timeline_ui(ctx: &ViewContext<'_>, ui: &mut egui::Ui, commands: &mut UiCommands) {
    let Some(run) = ctx.state.shown_run() else {
        return;
    };
    let Some(last) = run.steps.len().checked_sub(1) else {
        return;
    };
    let mut timeline = ctx.state.timeline;
    ui.horizontal(|ui| {
        let mut follow_live = timeline.cursor.is_none();
        if ui.checkbox(&mut follow_live, "Latest step").changed() {
            timeline.cursor = if follow_live { None } else { Some(last) };
        }
        let mut step = timeline.cursor.unwrap_or(last).min(last);
        let label = ui.label("Step");
        let response = ui
            .add(egui::Slider::new(&mut step, 0..=last).integer())
            .labelled_by(label.id);
        if response.changed() {
            timeline.cursor = if step == last && run.is_running() {
                None
            } else {
                Some(step)
            };
        }
        ui.checkbox(&mut timeline.only_this_step, "This step only");
        if let Some(record) = run.steps.get(step) {
            ui.weak(format!("t = {:.0}", record.timestep));
        }
    });
    if timeline != ctx.state.timeline {
        commands.push(UiCommand::SetTimeline(timeline));
    }
}

/// The status line: the standing error (red, wrapped, until the user's next action or "Dismiss")
/// above the latest message (wrapped too), with the history on hover.
pub(crate) fn status_line_ui(ctx: &ViewContext<'_>, ui: &mut egui::Ui, commands: &mut UiCommands) {
    let status = &ctx.state.status;
    let messages = status.messages();
    let history: Vec<String> = messages
        .iter()
        .rev()
        .take(10)
        .map(|message| message.text.clone())
        .collect();
    let history = history.join("\n");
    let standing_error = status.standing_error();
    if let Some(error) = standing_error {
        ui.horizontal(|ui| {
            if ui
                .small_button("Dismiss")
                .on_hover_text("Hide this error (it stays in the history)")
                .clicked()
            {
                commands.push(UiCommand::DismissError);
            }
            status_message_ui(ui, error).on_hover_text(&history);
        });
    }
    match messages.last() {
        Some(latest) if Some(latest) != standing_error => {
            status_message_ui(ui, latest).on_hover_text(&history);
        }
        Some(_) => {}
        None => {
            ui.weak("Ready");
        }
    }
}

/// One status message in its level's colour, wrapped at the panel's width.
fn status_message_ui(ui: &mut egui::Ui, message: &StatusMessage) -> egui::Response {
    let colour = match message.level {
        StatusLevel::Info => ui.visuals().text_color(),
        StatusLevel::Warning => ui.visuals().warn_fg_color,
        StatusLevel::Error => ui.visuals().error_fg_color,
    };
    ui.add(egui::Label::new(RichText::new(&message.text).color(colour)).wrap())
}

/// A seed from the clock (no RNG crate needed; only has to differ between clicks).
fn random_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |duration| duration.as_nanos());
    let mut value = nanos as u64 ^ 0x9E37_79B9_7F4A_7C15;
    value ^= value >> 33;
    value = value.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    value ^= value >> 33;
    value % 4_294_967_296
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::{GenerateParams, PromptInfo};

    #[test]
    fn the_progress_bar_says_cancelling_from_the_moment_cancel_is_asked_for() {
        let mut state = AppState::default();
        state.run_started(1, GenerateParams::default(), PromptInfo::default());
        assert!(progress(&state).1.starts_with("step 0/"));
        state.cancel_requested = true;
        assert_eq!(progress(&state).1, "cancelling... (step 0/20)");
        // Before the run started, too.
        state.supersede_runs(2);
        state.cancel_requested = true;
        assert_eq!(progress(&state).1, "cancelling...");
        // Once the run ended it says how it ended.
        state.run_cancelled(2, 0);
        state.run_cancelled(1, 0);
        assert_eq!(progress(&state).1, "cancelled after 0/20 steps");
    }

    #[test]
    fn an_error_stands_until_acknowledged_while_later_messages_pile_up() {
        let mut state = AppState::default();
        state
            .status
            .push(StatusLevel::Error, "cannot read session x");
        state.status.push(StatusLevel::Info, "Model loaded: m");
        assert_eq!(
            state
                .status
                .standing_error()
                .map(|message| message.text.as_str()),
            Some("cannot read session x")
        );
        state.status.acknowledge();
        assert!(state.status.standing_error().is_none());
        assert_eq!(state.status.messages().len(), 2);
    }
}
