//! The appearance transfer's panels: the mode switch, each slot's source and prompt, the settings
//! and Run / Cancel with progress (left); the output's exports, the masks and the probe (right).
//! They ask for changes with [`UiCommand::Appearance`].

use egui::Color32;

use crate::analysis::image::ImageFit;
use crate::ui::appearance::{AppearanceCommand, AppearanceTransfer, SlotSource, TransferOutcome};
use crate::ui::command::{UiCommand, UiCommands};
use crate::ui::context::ViewContext;
use crate::ui::dialogs::DialogPurpose;
use crate::worker::AppearanceSlot;

/// Colours of the masks over the slots, by label index.
pub(crate) const MASK_COLOURS: [[u8; 3]; 6] = [
    [250, 200, 50],
    [60, 160, 230],
    [230, 80, 60],
    [90, 200, 110],
    [180, 90, 220],
    [240, 140, 40],
];

fn push(commands: &mut UiCommands, command: AppearanceCommand) {
    commands.push(UiCommand::Appearance(command));
}

/// The mode switch (top of the left panel, in every mode).
pub(crate) fn mode_switch_ui(ctx: &ViewContext<'_>, ui: &mut egui::Ui, commands: &mut UiCommands) {
    let mut enabled = ctx.state.modes.appearance.enabled();
    if ui
        .checkbox(&mut enabled, "Appearance transfer")
        .on_hover_text(
            "Put one image's colours and textures on another image's shapes (cross-image \
             attention)",
        )
        .changed()
    {
        push(commands, AppearanceCommand::SetEnabled(enabled));
    }
    ui.separator();
}

/// The mode's controls (left panel, in place of the generation controls).
pub(crate) fn appearance_panel_ui(
    ctx: &ViewContext<'_>,
    ui: &mut egui::Ui,
    commands: &mut UiCommands,
) {
    let mode = &ctx.state.modes.appearance;
    let model_text = match (&ctx.state.model.loading, &ctx.state.model.loaded) {
        (Some(source), _) => format!("Model: loading {source}..."),
        (None, Some(info)) => format!("Model: {}", info.name),
        (None, None) => "Model: none".to_owned(),
    };
    ui.label(model_text);
    ui.separator();
    for slot in AppearanceSlot::BOTH {
        slot_ui(ctx, ui, mode, slot, commands);
        ui.separator();
    }
    settings_ui(ui, mode, commands);
    ui.separator();
    run_ui(ctx, ui, mode, commands);
}

/// One slot: where its image comes from and its prompt.
fn slot_ui(
    ctx: &ViewContext<'_>,
    ui: &mut egui::Ui,
    mode: &AppearanceTransfer,
    slot: AppearanceSlot,
    commands: &mut UiCommands,
) {
    let state = mode.slot(slot);
    let (heading, what) = match slot {
        AppearanceSlot::Structure => ("Structure image", "its shapes and places are kept"),
        AppearanceSlot::Appearance => ("Appearance image", "its colours and textures are taken"),
    };
    ui.strong(heading).on_hover_text(what);
    let source = match &state.source {
        _ if state.is_reading() => "reading...".to_owned(),
        SlotSource::Empty => "empty: open one or drop one on its slot".to_owned(),
        SlotSource::Image { name, image } => format!("{name} ({}x{})", image.width, image.height),
        SlotSource::Generate => "generated from the prompt".to_owned(),
    };
    ui.weak(source);
    ui.horizontal_wrapped(|ui| {
        let dialog_free = !ctx.dialog_open;
        if ui
            .add_enabled(
                dialog_free,
                egui::Button::new(format!("Open {} image...", slot.name())),
            )
            .clicked()
        {
            commands.push(UiCommand::OpenDialog(DialogPurpose::OpenAppearanceImage(
                slot,
            )));
        }
        if ui
            .button(format!("Use current image as {}", slot.name()))
            .on_hover_text("The image on screen: the latest generated image, else the opened one")
            .clicked()
        {
            push(commands, AppearanceCommand::UseCurrentImage(slot));
        }
        if ui
            .button(format!("Generate {} from prompt", slot.name()))
            .on_hover_text("attend generates the image from the prompt below before the transfer")
            .clicked()
        {
            push(commands, AppearanceCommand::GenerateFromPrompt(slot));
        }
        if state.source != SlotSource::Empty
            && ui.button(format!("Clear {}", slot.name())).clicked()
        {
            push(commands, AppearanceCommand::ClearSlot(slot));
        }
    });
    let mut prompt = state.prompt.clone();
    let label = ui.label(match slot {
        AppearanceSlot::Structure => "Structure prompt",
        AppearanceSlot::Appearance => "Appearance prompt",
    });
    let hint = match slot {
        AppearanceSlot::Structure => "what it shows, e.g. a red square",
        AppearanceSlot::Appearance => "what it shows, e.g. a green square",
    };
    if ui
        .add(
            egui::TextEdit::singleline(&mut prompt)
                .desired_width(f32::INFINITY)
                .hint_text(hint),
        )
        .labelled_by(label.id)
        .changed()
    {
        push(commands, AppearanceCommand::SetPrompt(slot, prompt));
    }
    if let Some(error) = &state.error {
        ui.colored_label(ui.visuals().error_fg_color, error);
    }
}

/// The transfer's settings, named by what they do.
fn settings_ui(ui: &mut egui::Ui, mode: &AppearanceTransfer, commands: &mut UiCommands) {
    let mut settings = mode.settings.clone();
    ui.strong("Settings");
    egui::Grid::new("attend.appearance.settings")
        .num_columns(2)
        .show(ui, |ui| {
            ui.label("Denoising steps").on_hover_text(
                "Steps of both inversions and of the output (the skip is a share of them)",
            );
            ui.add(egui::DragValue::new(&mut settings.steps).range(2..=1000));
            ui.end_row();
            ui.label("Keep structure (skipped steps)").on_hover_text(
                "Share of the steps the output skips, starting from the structure's inverted \
                 noise: more keeps the structure's layout more strictly",
            );
            ui.add(egui::Slider::new(&mut settings.skip_fraction, 0.0..=0.9).fixed_decimals(2));
            ui.end_row();
            ui.label("Match sharpness (contrast)").on_hover_text(
                "Attention contrast: above 1 each output pixel looks at fewer, better matching \
                 appearance pixels",
            );
            ui.add(egui::Slider::new(&mut settings.contrast, 1.0..=3.0).fixed_decimals(2));
            ui.end_row();
            ui.label("Appearance push, start").on_hover_text(
                "Swap guidance at the first guided step: how far the output is pushed from its \
                 own attention towards the appearance's (1: no push)",
            );
            ui.add(
                egui::Slider::new(&mut settings.swap_guidance_start, 1.0..=6.0).fixed_decimals(2),
            );
            ui.end_row();
            ui.label("Appearance push, end")
                .on_hover_text("Swap guidance at the last guided step (it falls linearly)");
            ui.add(egui::Slider::new(&mut settings.swap_guidance_end, 1.0..=6.0).fixed_decimals(2));
            ui.end_row();
        });
    ui.checkbox(
        &mut settings.adain,
        "Match colours per object (masked AdaIN)",
    )
    .on_hover_text(
        "Within each object found in both images (segmentation + prompt words), give the \
             output the appearance's colour statistics",
    );
    if settings != mode.settings {
        push(commands, AppearanceCommand::SetSettings(Box::new(settings)));
    }
    ui.horizontal(|ui| {
        let mut seed = mode.seed;
        let label = ui.label("Seed");
        if ui
            .add(egui::DragValue::new(&mut seed))
            .labelled_by(label.id)
            .changed()
        {
            push(commands, AppearanceCommand::SetSeed(seed));
        }
        let mut fit = mode.fit;
        egui::ComboBox::from_label("Fit")
            .selected_text(fit_name(fit))
            .show_ui(ui, |ui| {
                for choice in [ImageFit::Crop, ImageFit::Pad, ImageFit::Stretch] {
                    ui.selectable_value(&mut fit, choice, fit_name(choice));
                }
            })
            .response
            .on_hover_text("How an image of another size is fitted to the model's size");
        if fit != mode.fit {
            push(commands, AppearanceCommand::SetFit(fit));
        }
    });
}

fn fit_name(fit: ImageFit) -> &'static str {
    match fit {
        ImageFit::Crop => "crop",
        ImageFit::Pad => "pad",
        ImageFit::Stretch => "stretch",
    }
}

/// Run / Cancel and the transfer's progress.
fn run_ui(
    ctx: &ViewContext<'_>,
    ui: &mut egui::Ui,
    mode: &AppearanceTransfer,
    commands: &mut UiCommands,
) {
    ui.horizontal(|ui| {
        if ui
            .add_enabled(
                !mode.is_running(),
                egui::Button::new(egui::RichText::new("Run transfer").strong()),
            )
            .on_hover_text("Inverts both images, then runs the output step by step (Ctrl+Enter)")
            .clicked()
        {
            push(commands, AppearanceCommand::Run);
        }
        if ui
            .add_enabled(mode.is_running(), egui::Button::new("Cancel transfer"))
            .clicked()
        {
            push(commands, AppearanceCommand::Cancel);
        }
    });
    let (fraction, text) = progress(mode);
    ui.add(
        egui::ProgressBar::new(fraction)
            .text(text)
            .desired_width(ui.available_width()),
    );
    let _ = ctx;
}

/// The progress bar's fraction and text.
pub(crate) fn progress(mode: &AppearanceTransfer) -> (f32, String) {
    let Some(run) = mode.run() else {
        return (0.0, "idle".to_owned());
    };
    let fraction = run.steps_done as f32 / run.step_count.max(1) as f32;
    let text = match &run.outcome {
        TransferOutcome::Running if mode.cancelling => "cancelling...".to_owned(),
        TransferOutcome::Running => match &run.phase {
            Some(phase) => format!("{phase}..."),
            None => {
                let speed = run.timing.map_or_else(String::new, |timing| {
                    format!(", {:.2} s/step", timing.step_secs)
                });
                format!("step {}/{}{speed}", run.steps_done, run.step_count)
            }
        },
        TransferOutcome::Finished => format!(
            "done: {} steps in {:.1} s",
            run.step_count,
            run.result.as_ref().map_or(0.0, |result| result.seconds)
        ),
        TransferOutcome::Cancelled { steps_done } => {
            format!("cancelled after {steps_done}/{} steps", run.step_count)
        }
        TransferOutcome::Failed(_) => "failed".to_owned(),
    };
    (fraction, text)
}

/// The right panel: exports, masks and the probe.
pub(crate) fn appearance_side_panel_ui(
    ctx: &ViewContext<'_>,
    ui: &mut egui::Ui,
    commands: &mut UiCommands,
) {
    let mode = &ctx.state.modes.appearance;
    let result = mode.result();
    ui.heading("Output");
    let can_export = result.is_some() && !ctx.dialog_open;
    if ui
        .add_enabled(can_export, egui::Button::new("Export output..."))
        .on_hover_text("The output as a PNG")
        .clicked()
    {
        commands.push(UiCommand::OpenDialog(DialogPurpose::ExportAppearanceOutput));
    }
    if ui
        .add_enabled(can_export, egui::Button::new("Export all to folder..."))
        .on_hover_text(
            "output.png, structure.png and appearance.png (the reconstructions) and the masks",
        )
        .clicked()
    {
        commands.push(UiCommand::OpenDialog(DialogPurpose::ExportAppearanceAll));
    }
    if let Some(run) = mode.run() {
        if let TransferOutcome::Failed(message) = &run.outcome {
            ui.colored_label(ui.visuals().error_fg_color, message);
        }
    }
    ui.separator();

    ui.heading("Masks");
    let mut show = mode.masks_shown();
    if ui
        .checkbox(&mut show, "Show masks over the images")
        .on_hover_text("The regions whose colours were matched (masked AdaIN), by word")
        .changed()
    {
        push(commands, AppearanceCommand::ShowMasks(show));
    }
    match result {
        Some(result) if result.masks.structure.is_empty() => {
            ui.weak("No masks: colour matching was off or no object was found in both images");
        }
        Some(result) => {
            for (index, labelled) in result.masks.structure.iter().enumerate() {
                let [r, g, b] = MASK_COLOURS[index % MASK_COLOURS.len()];
                ui.horizontal(|ui| {
                    let (rect, _) =
                        ui.allocate_exact_size(egui::vec2(12.0, 12.0), egui::Sense::hover());
                    ui.painter()
                        .rect_filled(rect, 2.0, Color32::from_rgb(r, g, b));
                    let appearance_pixels = result
                        .masks
                        .appearance
                        .get(index)
                        .map_or(0, |mask| mask.mask.covered_pixels());
                    ui.add(
                        egui::Label::new(format!(
                            "{}: {} px in the structure, {appearance_pixels} px in the \
                             appearance",
                            labelled.label,
                            labelled.mask.covered_pixels()
                        ))
                        .wrap(),
                    );
                });
            }
        }
        None => {
            ui.weak("The masks appear when the transfer is done");
        }
    }
    ui.separator();

    ui.heading("Correspondence probe");
    ui.label("Click the output to see where in the appearance image that pixel attends.");
    match (mode.probe_point(), mode.probe_result()) {
        (Some((y, x)), Some((heatmap, (top_y, top_x)))) => {
            ui.label(format!("Output point: y {y:.2}, x {x:.2}"));
            ui.label(format!("Top match: y {top_y:.2}, x {top_x:.2}"));
            ui.weak(format!(
                "attention {:.4} to {:.4} (mean over heads, layers and steps)",
                heatmap.floor, heatmap.peak
            ));
        }
        (Some(_), None) if result.is_some() => {
            ui.weak("No correspondence was recorded for this transfer");
        }
        (Some(_), None) => {
            ui.weak("The probe shows once the transfer is done");
        }
        (None, _) => {}
    }
    if mode.probe_point().is_some() && ui.button("Clear probe").clicked() {
        push(commands, AppearanceCommand::Probe(None));
    }
}
