//! The style set panel (left, under Generate): style set mode on or off, the target prompts (add,
//! edit, remove), the sharing options named by what they do, run / cancel with progress, and
//! "Export all". It edits a copy of the mode's settings and asks for the change with
//! [`StyleSetCommand::SetSettings`].

use crate::ui::command::{UiCommand, UiCommands};
use crate::ui::context::ViewContext;
use crate::ui::style_set::{StyleSetCommand, StyleSetSettings};

/// Style set mode's controls.
pub(crate) fn style_set_panel_ui(
    ctx: &ViewContext<'_>,
    ui: &mut egui::Ui,
    commands: &mut UiCommands,
) {
    ui.separator();
    let style = &ctx.state.modes.style_set;
    let mut enabled = style.enabled();
    if ui
        .checkbox(&mut enabled, "Style set mode")
        .on_hover_text(
            "Style Aligned: images of several prompts that share the style of a reference \
             (the prompt above)",
        )
        .changed()
    {
        commands.push(UiCommand::StyleSet(StyleSetCommand::SetEnabled(enabled)));
    }
    if !style.enabled() {
        return;
    }
    let mut settings = style.settings().clone();
    if ctx.state.image.is_open() {
        ui.weak(
            "The reference is the open image, described by the prompt above; each target gets \
             its own image in its style.",
        );
    } else {
        ui.weak(
            "The reference is the prompt above (or an image: open or drop one); each target \
             gets its own image in its style.",
        );
    }
    targets_ui(ui, &mut settings, commands);
    sharing_ui(ui, &mut settings);

    let running = style.is_running();
    ui.horizontal(|ui| {
        let can_run = !settings.targets.is_empty() && ctx.state.model.loaded.is_some();
        if ui
            .add_enabled(can_run, egui::Button::new("Run set"))
            .on_hover_text("Generates the reference and every target as one batch")
            .clicked()
        {
            commands.push(UiCommand::Generate);
        }
        if ui
            .add_enabled(running, egui::Button::new("Cancel set"))
            .clicked()
        {
            commands.push(UiCommand::Cancel);
        }
    });
    if let Some(progress) = progress_text(ctx) {
        ui.label(progress);
    }
    if let Some(error) = style.error() {
        ui.colored_label(ui.visuals().error_fg_color, error);
    }

    ui.horizontal(|ui| {
        let label = ui.label("Export folder");
        ui.add(
            egui::TextEdit::singleline(&mut settings.export_folder)
                .desired_width(f32::INFINITY)
                .hint_text("style-set"),
        )
        .labelled_by(label.id);
    });
    if ui
        .add_enabled(style.finished(), egui::Button::new("Export all"))
        .on_hover_text("Writes reference.png, 1.png ... N.png and grid.png into the export folder")
        .clicked()
    {
        commands.push(UiCommand::StyleSet(StyleSetCommand::ExportAll));
    }
    if settings != *style.settings() {
        commands.push_first(UiCommand::StyleSet(StyleSetCommand::SetSettings(Box::new(
            settings,
        ))));
    }
}

/// The target prompts: one editable line each with its remove button, and the line to add one.
fn targets_ui(ui: &mut egui::Ui, settings: &mut StyleSetSettings, commands: &mut UiCommands) {
    ui.label(format!("Target prompts ({})", settings.targets.len()));
    let mut removed = None;
    for (index, prompt) in settings.targets.iter_mut().enumerate() {
        ui.horizontal(|ui| {
            let label = ui.label(format!("{}.", index + 1));
            ui.add(egui::TextEdit::singleline(prompt).desired_width(160.0))
                .labelled_by(label.id);
            if ui
                .small_button(format!("Remove {}", index + 1))
                .on_hover_text("Takes this prompt out of the set")
                .clicked()
            {
                removed = Some(index);
            }
        });
    }
    if let Some(index) = removed {
        settings.targets.remove(index);
    }
    let label = ui.label("New target prompt");
    let response = ui
        .add(
            egui::TextEdit::singleline(&mut settings.new_target)
                .desired_width(f32::INFINITY)
                .hint_text("a house"),
        )
        .labelled_by(label.id);
    let entered = response.lost_focus() && ui.input(|input| input.key_pressed(egui::Key::Enter));
    let can_add = !settings.new_target.trim().is_empty();
    let clicked = ui
        .add_enabled(can_add, egui::Button::new("Add target"))
        .clicked();
    if can_add && (clicked || entered) {
        let prompt = std::mem::take(&mut settings.new_target);
        settings.targets.push(prompt.trim().to_owned());
    }
    let _ = commands;
}

/// Whether and how the targets share the reference's attention.
fn sharing_ui(ui: &mut egui::Ui, settings: &mut StyleSetSettings) {
    ui.checkbox(&mut settings.share, "Share the reference's style")
        .on_hover_text("Off: every image is generated on its own (the same seeds), to compare");
    if !settings.share {
        return;
    }
    let config = &mut settings.config;
    ui.checkbox(
        &mut config.share_group_norm,
        "Share colour statistics (group norm)",
    )
    .on_hover_text("Targets normalise their features together with the reference's");
    ui.add(
        egui::Slider::new(&mut config.shared_score_shift, -2.0..=3.0)
            .text("Strength of the reference (shift)"),
    )
    .on_hover_text("Added to the targets' attention logits on the reference (0: plain sharing)");
    ui.add(
        egui::Slider::new(&mut config.shared_score_scale, 0.25..=2.0)
            .text("Weight of the reference's keys (scale)"),
    );
    ui.add(
        egui::Slider::new(&mut config.only_self_level, 0.0..=1.0).text("Plain layers (fraction)"),
    )
    .on_hover_text("This share of the self-attention layers (evenly spaced) does not share");
    ui.checkbox(
        &mut config.adain_queries,
        "Match the targets' queries to the reference (AdaIN)",
    );
    ui.checkbox(
        &mut config.adain_keys,
        "Match the targets' keys to the reference (AdaIN)",
    );
    ui.checkbox(
        &mut config.adain_values,
        "Match the targets' values to the reference (AdaIN)",
    );
}

/// "Step s/n, k images" while the set runs.
fn progress_text(ctx: &ViewContext<'_>) -> Option<String> {
    let style = &ctx.state.modes.style_set;
    if !style.is_running() {
        return None;
    }
    let count = style.images().len();
    let reference = style.image(0)?;
    Some(format!(
        "Step {}/{} of {count} images",
        reference.steps.len(),
        reference.step_count
    ))
}
